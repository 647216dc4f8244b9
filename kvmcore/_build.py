"""cffi build script: kvmcore's ioctl bindings, compiled against <linux/kvm.h>.

API (out-of-line) mode, so the C compiler -- not this file -- supplies every
ioctl number and checks every struct declared below: they are written without
a trailing ``...;``, and a field that drifts from the kernel header fails the
build ("wrong offset" / "wrong total size").  The single exception is
``struct kvm_run``, a 2 KiB union-bearing struct of which only the head is
needed; it ends in ``...;`` and cffi takes its real offsets from the compiler.

Run by setuptools through ``cffi_modules`` (see setup.py).
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = r"""
typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;

/* --- system ioctls (/dev/kvm) --- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...

/* --- VM ioctls --- */
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_XEN_HVM_CONFIG ...
#define KVM_XEN_HVM_GET_ATTR ...
#define KVM_XEN_HVM_SET_ATTR ...
#define KVM_ENABLE_CAP ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CLEAR_DIRTY_LOG ...

/* --- vCPU ioctls --- */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_TSC_KHZ ...
#define KVM_HAS_DEVICE_ATTR ...
#define KVM_GET_DEVICE_ATTR ...
#define KVM_SET_DEVICE_ATTR ...
#define KVM_XEN_VCPU_GET_ATTR ...
#define KVM_XEN_VCPU_SET_ATTR ...
#define KVM_GET_CLOCK_GUEST ...
#define KVM_SET_CLOCK_GUEST ...

/* --- capabilities and flags --- */
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_VCPU_ATTRIBUTES ...
#define KVM_CAP_XEN_HVM ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_CLOCK_REALTIME ...
#define KVM_CLOCK_HOST_TSC ...
#define KVM_VCPU_TSC_CTRL ...
#define KVM_VCPU_TSC_OFFSET ...
#define KVM_VCPU_TSC_SCALE ...
#define KVM_XEN_HVM_CONFIG_HYPERCALL_MSR ...
#define KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL ...
#define KVM_XEN_HVM_CONFIG_SHARED_INFO ...
#define KVM_XEN_HVM_CONFIG_RUNSTATE ...
#define KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL ...
#define KVM_XEN_HVM_CONFIG_EVTCHN_SEND ...
#define KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG ...
#define KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE ...
#define KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA ...
#define KVM_XEN_ATTR_TYPE_LONG_MODE ...
#define KVM_XEN_ATTR_TYPE_SHARED_INFO ...
#define KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR ...
#define KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT ...
#define KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA ...
#define KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST ...

/* --- exit reasons --- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_IO_OUT ...

/* --- x86 MSRs and CPUID bits the guest and the migration use --- */
#define MSR_KVM_SYSTEM_TIME_NEW ...
#define MSR_KVM_STEAL_TIME ...
#define MSR_KVM_WALL_CLOCK_NEW ...
#define KVM_MSR_ENABLED ...
#define KVM_CPUID_FEATURES ...
#define KVM_FEATURE_CLOCKSOURCE2 ...
#define KVM_FEATURE_STEAL_TIME ...
#define KVM_FEATURE_CLOCKSOURCE_STABLE_BIT ...

#define KVMCORE_RUN_EXIT_OFFSET ...

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

/* KVM_GET_DIRTY_LOG: one bit per page of the slot, in a buffer the caller owns. */
struct kvm_dirty_log {
    __u32 slot;
    __u32 padding1;
    union {
        void *dirty_bitmap;
        __u64 padding2;
    };
};

/* KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): re-protect the pages set here. */
struct kvm_clear_dirty_log {
    __u32 slot;
    __u32 num_pages;
    __u64 first_page;
    union {
        void *dirty_bitmap;
        __u64 padding2;
    };
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    __u8  pad[64];
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    __u8  padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];   /* (KVM_NR_INTERRUPTS + 63) / 64 */
};

struct kvm_fpu {
    __u8  fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8  ftwx;
    __u8  pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8  xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_msr_entry {
    __u32 index;
    __u32 reserved;
    __u64 data;
};

struct kvm_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};

struct kvm_cpuid2 {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    __u32 pad0;
    __u64 realtime;
    __u64 host_tsc;
    __u32 pad[4];
};

struct kvm_device_attr {
    __u32 flags;
    __u32 group;
    __u64 attr;
    __u64 addr;
};

struct kvm_xen_hvm_config {
    __u32 flags;
    __u32 msr;
    __u64 blob_addr_32;
    __u64 blob_addr_64;
    __u8 blob_size_32;
    __u8 blob_size_64;
    __u8 pad2[30];
};

struct kvm_xen_hvm_attr {
    __u16 type;
    __u16 pad[3];
    union {
        __u8 long_mode;
        __u8 vector;
        struct {
            __u64 gfn;
        } shared_info;
        struct {
            __u32 send_port;
            __u32 type;
            __u32 flags;
            union {
                struct {
                    __u32 port;
                    __u32 vcpu;
                    __u32 priority;
                } port;
                struct {
                    __u32 port;
                    __s32 fd;
                } eventfd;
                __u32 padding[4];
            } deliver;
        } evtchn;
        __u32 xen_version;
        __u64 pad[8];
    } u;
};

struct kvm_xen_vcpu_attr {
    __u16 type;
    __u16 pad[3];
    union {
        __u64 gpa;
        __u64 pad[8];
        struct {
            __u64 state;
            __u64 state_entry_time;
            __u64 time_running;
            __u64 time_runnable;
            __u64 time_blocked;
            __u64 time_offline;
        } runstate;
        __u32 vcpu_id;
        struct {
            __u32 port;
            __u32 priority;
            __u64 expires_ns;
        } timer;
        __u8 vector;
    } u;
};

/* Only the head of kvm_run is used; the exit union is reached via KVMCORE_RUN_EXIT_OFFSET. */
struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    ...;
};

/* kvm_run's exit union members we read (layouts asserted in the C source). */
struct kvmcore_exit_io {
    __u8 direction;
    __u8 size;
    __u16 port;
    __u32 count;
    __u64 data_offset;
};

struct kvm_steal_time {
    __u64 steal;
    __u32 version;
    __u32 flags;
    __u8  preempted;
    __u8  u8_pad[3];
    __u32 pad[11];
};

/* ioctl(2) is variadic; these fix the third argument's type (no cdata casts per call). */
int kvmcore_ioctl(int fd, unsigned long request, void *arg);
int kvmcore_ioctl_int(int fd, unsigned long request, unsigned long arg);
"""


def guest_abi_cdef() -> str:
    """guest_program/abi.h's constants and structs, for cffi: one definition for guest and host.

    The constants become ``#define NAME ...`` (values from the compiler); the structs
    between the cdef-begin/cdef-end markers are plain C that cffi parses as is.
    """
    with open(os.path.join(HERE, "guest_program", "abi.h")) as f:
        text = f.read()
    names = re.findall(r"^#define\s+(KVMCORE_[A-Z0-9_]+)\s+\S", text, re.MULTILINE)
    structs = text.split("cdef-begin")[1].split("*/", 1)[1].split("/* cdef-end */")[0]
    return "".join(f"#define {n} ...\n" for n in names if not n.endswith("_H")) + structs


SOURCE = r"""
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <asm/kvm_para.h>
#include "guest_program/abi.h"
#include "_uapi_newer.h"

#define KVMCORE_RUN_EXIT_OFFSET offsetof(struct kvm_run, io)

struct kvmcore_exit_io {
    __u8 direction;
    __u8 size;
    __u16 port;
    __u32 count;
    __u64 data_offset;
};

#define member_size(type, m) sizeof(((type *)0)->m)
_Static_assert(sizeof(struct kvmcore_exit_io) == member_size(struct kvm_run, io),
               "kvm_run.io layout");
_Static_assert(sizeof(struct kvmcore_steal_time) == sizeof(struct kvm_steal_time),
               "guest_program/abi.h kvmcore_steal_time must match <asm/kvm_para.h>");
_Static_assert(sizeof(struct pvclock_vcpu_time_info) == 32, "asm/pvclock-abi.h layout");
_Static_assert(sizeof(struct kvmcore_runstate_info) == 0x30, "64-bit vcpu_runstate_info");

static int kvmcore_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

static int kvmcore_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}
"""

ffi = FFI()
ffi.cdef(CDEF + guest_abi_cdef())
ffi.set_source(
    "kvmcore._kvm",
    SOURCE,
    include_dirs=[HERE],
    extra_compile_args=["-Wall", "-Werror", "-Wno-unused-function"],
    depends=[os.path.join(HERE, "_uapi_newer.h"), os.path.join(HERE, "guest_program", "abi.h")],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=HERE, verbose=True)
