// SPDX-License-Identifier: GPL-2.0-only
/*
 * The in-process migration cycle of bench/kvmcore_cycle.py, as plain C: the same
 * ioctl sequence kvmcore issues for Strategy "clock=realtime,tsc=none" (this
 * host's best; see docs/kvmcore.md), so the Python/C ratio is kvmcore's overhead.
 *
 *   cycle GUEST_BIN MEMORY_BYTES CYCLES
 *
 * Prints one line per phase: "<phase> <median ns>".
 */
#define _GNU_SOURCE
#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include <asm/kvm_para.h>
#include "abi.h"

#define MSR_IA32_TSC_ADJUST 0x3b
#define NPHASES 6
static const char *phase_names[NPHASES] = {
	"create", "setup", "run", "capture", "restore", "first_entry" };

static int kvm_fd, run_size;
static uint8_t image[1 << 16];
static size_t image_size;

#define IOCTL(fd, req, arg) ({						\
	int __r = ioctl(fd, req, arg);					\
	if (__r < 0)							\
		err(1, "%s", #req);					\
	__r; })

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

struct vm {
	int fd, vcpu;
	struct kvm_run *run;
	uint8_t *mem;
	size_t size;
};

struct state {
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_fpu fpu;
	struct { struct kvm_msrs h; struct kvm_msr_entry e[3]; } msrs;
	struct kvm_clock_data clock;
	uint64_t tsc_offset;
	int tsc_khz;
};

/* VM, memory slot, vCPU with CPUID: shared by create and restore. */
static void vm_create(struct vm *vm)
{
	/* Read once, as kvmcore's System.cpuid() does: a host constant. */
	static struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid;
	struct kvm_userspace_memory_region region = {
		.memory_size = vm->size, .userspace_addr = (uintptr_t)vm->mem };

	vm->fd = IOCTL(kvm_fd, KVM_CREATE_VM, 0);
	IOCTL(vm->fd, KVM_SET_USER_MEMORY_REGION, &region);
	vm->vcpu = IOCTL(vm->fd, KVM_CREATE_VCPU, 0);
	vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
	if (vm->run == MAP_FAILED)
		err(1, "mmap kvm_run");
	if (!cpuid.h.nent) {
		cpuid.h.nent = 256;
		IOCTL(kvm_fd, KVM_GET_SUPPORTED_CPUID, &cpuid);
	}
	IOCTL(vm->vcpu, KVM_SET_CPUID2, &cpuid);
}

static void vm_destroy(struct vm *vm)
{
	munmap(vm->run, run_size);
	close(vm->vcpu);
	close(vm->fd);
}

static void set_segment(struct kvm_segment *s, uint16_t sel, uint8_t type, int l)
{
	s->base = 0; s->limit = 0xffffffff; s->selector = sel; s->type = type;
	s->present = 1; s->dpl = 0; s->s = 1; s->g = 1; s->avl = 0; s->unusable = 0;
	s->l = l; s->db = !l;
}

static void setup(struct vm *vm)
{
	uint64_t *pml4 = (void *)(vm->mem + KVMCORE_PML4_GPA);
	uint64_t *pdpt = (void *)(vm->mem + KVMCORE_PDPT_GPA);
	uint64_t *pd = (void *)(vm->mem + KVMCORE_PD_GPA);
	uint64_t *gdt = (void *)(vm->mem + KVMCORE_GDT_GPA);
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	memcpy(vm->mem + KVMCORE_CODE_GPA, image, image_size);
	pml4[0] = KVMCORE_PDPT_GPA | 3;
	pdpt[0] = KVMCORE_PD_GPA | 3;
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;
	gdt[0] = 0; gdt[1] = 0x00af9b000000ffffull; gdt[2] = 0x00cf93000000ffffull;

	IOCTL(vm->vcpu, KVM_GET_SREGS, &sregs);
	sregs.cr0 = 0x80050033; sregs.cr4 = 0x20; sregs.cr3 = KVMCORE_PML4_GPA;
	sregs.efer = 0x500;
	sregs.gdt.base = KVMCORE_GDT_GPA; sregs.gdt.limit = 23;
	set_segment(&sregs.cs, 8, 11, 1);
	set_segment(&sregs.ds, 16, 3, 0); set_segment(&sregs.es, 16, 3, 0);
	set_segment(&sregs.fs, 16, 3, 0); set_segment(&sregs.gs, 16, 3, 0);
	set_segment(&sregs.ss, 16, 3, 0);
	IOCTL(vm->vcpu, KVM_SET_SREGS, &sregs);
	IOCTL(vm->vcpu, KVM_GET_REGS, &regs);
	regs.rip = KVMCORE_CODE_GPA; regs.rsp = KVMCORE_STACK_TOP; regs.rflags = 2;
	IOCTL(vm->vcpu, KVM_SET_REGS, &regs);
}

static void run_until_report(struct vm *vm)
{
	for (;;) {
		if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			err(1, "KVM_RUN");
		}
		if (vm->run->exit_reason == KVM_EXIT_IO &&
		    vm->run->io.port == KVMCORE_REPORT_PORT)
			return;
		errx(1, "unexpected exit %u", vm->run->exit_reason);
	}
}

static void capture(struct vm *vm, struct state *st)
{
	uint64_t offset_addr = (uintptr_t)&st->tsc_offset;
	struct kvm_device_attr attr = { .group = KVM_VCPU_TSC_CTRL,
					.attr = KVM_VCPU_TSC_OFFSET, .addr = offset_addr };
	uint8_t pvti[32];

	vm->run->immediate_exit = 1;
	if (ioctl(vm->vcpu, KVM_RUN, 0) == 0 || errno != EINTR)
		errx(1, "KVM_RUN with immediate_exit did not return EINTR");
	vm->run->immediate_exit = 0;
	IOCTL(vm->vcpu, KVM_GET_REGS, &st->regs);
	IOCTL(vm->vcpu, KVM_GET_SREGS, &st->sregs);
	IOCTL(vm->vcpu, KVM_GET_FPU, &st->fpu);
	st->msrs.h.nmsrs = 3;
	st->msrs.e[0].index = MSR_KVM_SYSTEM_TIME_NEW;
	st->msrs.e[1].index = MSR_KVM_STEAL_TIME;
	st->msrs.e[2].index = MSR_IA32_TSC_ADJUST;
	if (IOCTL(vm->vcpu, KVM_GET_MSRS, &st->msrs) != 3)
		errx(1, "KVM_GET_MSRS short");
	st->tsc_khz = IOCTL(vm->vcpu, KVM_GET_TSC_KHZ, 0);
	IOCTL(vm->fd, KVM_GET_CLOCK, &st->clock);
	IOCTL(vm->vcpu, KVM_HAS_DEVICE_ATTR, &attr);
	IOCTL(vm->vcpu, KVM_GET_DEVICE_ATTR, &attr);
	/* KVM_GET_CLOCK_GUEST (v4-v6 number), absent here: EINVAL, as kvmcore probes it. */
	ioctl(vm->vcpu, _IOR(KVMIO, 0xd7, uint8_t[32]), pvti);
}

static void restore(struct vm *vm, struct state *st)
{
	struct kvm_clock_data clock = { .clock = st->clock.clock, .flags = KVM_CLOCK_REALTIME,
					.realtime = st->clock.realtime };

	vm_create(vm);
	IOCTL(vm->vcpu, KVM_SET_SREGS, &st->sregs);
	IOCTL(vm->vcpu, KVM_SET_REGS, &st->regs);
	IOCTL(vm->vcpu, KVM_SET_FPU, &st->fpu);
	st->msrs.h.nmsrs = 2;	/* TSC_ADJUST only for tsc=adjust */
	IOCTL(vm->vcpu, KVM_SET_MSRS, &st->msrs);
	IOCTL(vm->fd, KVM_SET_CLOCK, &clock);
	IOCTL(vm->fd, KVM_GET_CLOCK, &clock);
	IOCTL(vm->vcpu, KVM_GET_TSC_KHZ, 0);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	if (argc != 4)
		errx(2, "usage: %s GUEST_BIN MEMORY_BYTES CYCLES", argv[0]);
	size_t size = strtoull(argv[2], NULL, 0);
	int cycles = atoi(argv[3]);
	uint64_t (*t)[NPHASES] = calloc(cycles, sizeof(*t));
	FILE *f = fopen(argv[1], "rb");

	if (!f)
		err(1, "%s", argv[1]);
	image_size = fread(image, 1, sizeof(image), f);
	fclose(f);
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		err(1, "/dev/kvm");
	run_size = IOCTL(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);

	for (int i = 0; i < cycles; i++) {
		struct vm src = { .size = size }, dst = { .size = size };
		struct state st;
		uint64_t t0, t1, t2, t3, t4, t5, t6;

		t0 = now_ns();
		src.mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			       -1, 0);
		vm_create(&src);
		t1 = now_ns();
		setup(&src);
		t2 = now_ns();
		run_until_report(&src);
		t3 = now_ns();
		capture(&src, &st);
		vm_destroy(&src);
		t4 = now_ns();
		dst.mem = src.mem;		/* in-process: the same RAM, not copied */
		restore(&dst, &st);
		t5 = now_ns();
		run_until_report(&dst);
		t6 = now_ns();
		vm_destroy(&dst);
		munmap(src.mem, size);
		t[i][0] = t1 - t0; t[i][1] = t2 - t1; t[i][2] = t3 - t2;
		t[i][3] = t4 - t3; t[i][4] = t5 - t4; t[i][5] = t6 - t5;
	}
	for (int p = 0; p < NPHASES; p++) {
		uint64_t *v = calloc(cycles, sizeof(*v));

		for (int i = 0; i < cycles; i++)
			v[i] = t[i][p];
		qsort(v, cycles, sizeof(*v), cmp_u64);
		printf("%s %llu\n", phase_names[p], (unsigned long long)v[cycles / 2]);
		free(v);
	}
	return 0;
}
