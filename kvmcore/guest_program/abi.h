/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The contract between the guest program and the host: where things live in
 * guest-physical memory, and the layout of the report page the guest fills
 * before each port-I/O exit.
 *
 * This header is compiled twice: freestanding into the guest, and into the
 * host's cffi module, whose cdef repeats these structs without "...;" so the
 * compiler rejects any drift between the two.
 */
#ifndef KVMCORE_GUEST_ABI_H
#define KVMCORE_GUEST_ABI_H

#ifndef __ASSEMBLER__
#include <stdint.h>
#endif

/* Guest-physical layout (identity mapped, so these are also the guest's virtual addresses). */
#define KVMCORE_PML4_GPA	0x1000	/* page tables, built by the host like the selftests do */
#define KVMCORE_PDPT_GPA	0x2000
#define KVMCORE_PD_GPA		0x3000	/* 512 x 2 MiB pages: the first GiB */
#define KVMCORE_GDT_GPA		0x4000	/* null, code, data descriptors */
#define KVMCORE_REPORT_GPA	0x5000	/* struct kvmcore_report */
#define KVMCORE_PVCLOCK_GPA	0x6000	/* MSR_KVM_SYSTEM_TIME_NEW target */
#define KVMCORE_STEAL_GPA	0x7000	/* MSR_KVM_STEAL_TIME target (64-byte aligned) */
#define KVMCORE_SHINFO_GPA	0x8000	/* Xen shared_info page, when Xen-configured */
#define KVMCORE_RUNSTATE_GPA	0x9000	/* Xen vcpu_runstate_info, when Xen-configured */
#define KVMCORE_CONFIG_GPA	0xa000	/* struct kvmcore_config: written by the host, read-only to the guest */
#define KVMCORE_CODE_GPA	0x10000	/* guest.bin is loaded here; entry point is its first byte */
#define KVMCORE_STACK_TOP	0x80000	/* stack grows down towards the code */
#define KVMCORE_MIN_MEMORY	0x200000 /* one 2 MiB page holds all of the above */
#define KVMCORE_WORKSET_GPA	0x100000 /* the dirtying workload's pages: from here, working_set bytes */
#define KVMCORE_PAGE_SIZE	0x1000	/* the unit of the workload and of KVM's dirty log */
#define KVMCORE_DIRTY_RATE_MAX	0x100000000ULL /* 4 GiB/s: rate x 1 s of ns stays in 64 bits */

#define KVMCORE_REPORT_PORT	0x4b4d	/* "KM": `out` here means "a snapshot is ready" */
#define KVMCORE_REPORT_MAGIC	0x54504e534d564bULL /* "KVMSNPT" */
#define KVMCORE_XEN_HYPERCALL_MSR 0x40000000 /* configuring it turns on runstate accounting */

#ifndef __ASSEMBLER__
/* cdef-begin: _build.py feeds the structs from here to cdef-end to cffi verbatim. */

/*
 * The pvclock record KVM writes to the guest's kvmclock page (the kernel's
 * arch/x86/include/asm/pvclock-abi.h; not exported to UAPI), and also the
 * argument of KVM_[GS]ET_CLOCK_GUEST.
 */
struct pvclock_vcpu_time_info {
	uint32_t version;
	uint32_t pad0;
	uint64_t tsc_timestamp;
	uint64_t system_time;
	uint32_t tsc_to_system_mul;
	int8_t tsc_shift;
	uint8_t flags;
	uint8_t pad[2];
};	/* packed in the kernel; every field is naturally aligned, so the layout is the same */

/* Xen's public vcpu_runstate_info, 64-bit layout (KVM_XEN_ATTR_TYPE_LONG_MODE = 1): 0x30 bytes. */
struct kvmcore_runstate_info {
	uint32_t state;
	uint32_t pad0;
	uint64_t state_entry_time;
	uint64_t time[4];	/* running, runnable, blocked, offline */
};

/* Same layout as <asm/kvm_para.h> struct kvm_steal_time (asserted host-side). */
struct kvmcore_steal_time {
	uint64_t steal;
	uint32_t version;
	uint32_t flags;
	uint8_t preempted;
	uint8_t u8_pad[3];
	uint32_t pad[11];
};

/*
 * One snapshot. The guest rewrites it in place before every report; the
 * fields after it persist across reports (and across a migration, since
 * memory is carried), which is what makes "went backwards" detectable.
 */
struct kvmcore_report {
	uint64_t magic;
	uint64_t sequence;		/* 1, 2, 3 ... across migrations */
	uint64_t tsc;			/* rdtsc taken inside the pvclock read */
	uint64_t kvmclock_ns;		/* pvclock record applied to tsc */
	uint64_t pvclock_retries;	/* odd/changed version seen while reading */
	struct pvclock_vcpu_time_info pvclock;
	struct kvmcore_steal_time steal;
	struct kvmcore_runstate_info runstate;
	/* Persistent across reports. */
	uint64_t last_kvmclock_ns;
	uint64_t backwards_count;	/* times kvmclock_ns < last_kvmclock_ns */
	uint64_t backwards_prev_ns;	/* the last such step: from ... */
	uint64_t backwards_next_ns;	/* ... to */
	/* The dirtying workload's progress (all zero while struct kvmcore_config asks for none). */
	uint64_t dirty_generation;	/* stamps written so far; the newest page holds this value */
	uint64_t dirty_cursor;		/* next page of the working set to write */
	uint64_t dirty_last_ns;		/* kvmclock_ns when the workload last ran */
	uint64_t dirty_credit;		/* rate x ns earned but not yet spent on a page */
};

/*
 * What the host asks of the guest, written before its first entry and carried
 * with memory like everything else (a destination never rewrites it). Zero is
 * "no workload": the guest then writes nothing but its report page.
 *
 * The workload writes dirty_rate bytes per second of kvmclock time, one page
 * at a time, round-robin over working_set bytes from KVMCORE_WORKSET_GPA.
 * Writing a page stores ++dirty_generation in its first 8 bytes (QEMU's
 * migration-test guest does the same with a byte), so a page's stamp says when
 * it was last written: a copy of guest memory can be checked page by page, and
 * a stamp newer than the source's last generation was written after a resume.
 */
struct kvmcore_config {
	uint64_t dirty_rate;		/* bytes per second; 0 = no workload */
	uint64_t working_set;		/* bytes, a multiple of KVMCORE_PAGE_SIZE */
};

/* cdef-end */
#endif /* __ASSEMBLER__ */

#endif /* KVMCORE_GUEST_ABI_H */
