/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * KVM UAPI newer than the installed <linux/kvm.h> (Debian's linux-libc-dev
 * 6.1 here), declared in this one place. Each block is skipped when the
 * installed headers already provide it, so newer headers win.
 */
#ifndef KVMCORE_UAPI_NEWER_H
#define KVMCORE_UAPI_NEWER_H

#include <linux/kvm.h>
#include "guest_program/abi.h"	/* struct pvclock_vcpu_time_info */

/*
 * KVM_[GS]ET_CLOCK_GUEST: per-vCPU, x86_64. From the series "KVM: x86: Add
 * KVM_[GS]ET_CLOCK_GUEST for accurate KVM clock migration" (Jack Allister,
 * David Woodhouse), numbers as in its v4 (May 2026) to v6 (July 2026)
 * postings; not merged upstream. The 2024 posting used 0xd5/0xd6, but 0xd5
 * is upstream's KVM_PRE_FAULT_MEMORY: never issue those.
 */
#ifndef KVM_SET_CLOCK_GUEST
#define KVM_SET_CLOCK_GUEST	_IOW(KVMIO, 0xd6, struct pvclock_vcpu_time_info)
#endif
#ifndef KVM_GET_CLOCK_GUEST
#define KVM_GET_CLOCK_GUEST	_IOR(KVMIO, 0xd7, struct pvclock_vcpu_time_info)
#endif

/*
 * Attribute 1 of group KVM_VCPU_TSC_CTRL: the vCPU's TSC scaling ratio.
 * From the same series' v6 (Documentation/virt/kvm/devices/vcpu.rst there);
 * ENXIO without hardware TSC scaling.
 */
#ifndef KVM_VCPU_TSC_SCALE
#define KVM_VCPU_TSC_SCALE	1
#endif

/* KVM_CAP_XEN_HVM flag bits added after 6.1 (upstream include/uapi/linux/kvm.h). */
#ifndef KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG	/* Linux 6.3 */
#define KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG	(1 << 6)
#endif
#ifndef KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE	/* Linux 6.10 */
#define KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE	(1 << 7)
#endif
#ifndef KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA	/* Linux 6.10 */
#define KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA	(1 << 8)
#endif

#endif /* KVMCORE_UAPI_NEWER_H */
