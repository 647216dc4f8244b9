// SPDX-License-Identifier: GPL-2.0-only
/*
 * The migrated guest: enables kvmclock and KVM steal time itself, then loops
 * forever taking a snapshot of what it sees and reporting it to the host with
 * an `out` to KVMCORE_REPORT_PORT (the selftests' ucall, reduced to one
 * message). Everything it keeps lives in guest memory or registers, so a
 * destination that carries both resumes the loop where the source stopped.
 *
 * Freestanding: no libc, general-purpose registers only (so the vCPU has no
 * FPU/SSE state worth migrating), identity-mapped, entered in long mode.
 */
#include <asm/kvm_para.h>
#include "abi.h"

#define barrier() __asm__ __volatile__("" ::: "memory")

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	/* lfence: do not let the TSC read drift outside the version window. */
	__asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
	return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t value)
{
	__asm__ __volatile__("wrmsr" :: "c"(msr), "a"((uint32_t)value),
			     "d"((uint32_t)(value >> 32)) : "memory");
}

static inline void report(uint64_t sequence)
{
	/* The host reads the report page, then re-enters: the `out` completes. */
	__asm__ __volatile__("outl %%eax, %%dx" :: "a"((uint32_t)sequence),
			     "d"(KVMCORE_REPORT_PORT) : "memory");
}

/* The kernel's pvclock_scale_delta(): ns = ((delta << shift) * mul) >> 32. */
static uint64_t pvclock_scale(uint64_t delta, uint32_t mul, int8_t shift)
{
	if (shift < 0)
		delta >>= -shift;
	else
		delta <<= shift;
	return (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

static void copy(volatile void *dst, const volatile void *src, unsigned long n)
{
	volatile uint8_t *d = dst;
	const volatile uint8_t *s = src;

	while (n--)
		*d++ = *s++;
}

/*
 * Read the pvclock record and the TSC as one consistent pair: KVM makes the
 * version odd while it rewrites the record, so retry until an even version is
 * seen unchanged on both sides of the copy.
 */
static void read_pvclock(volatile struct kvmcore_report *r)
{
	const volatile struct pvclock_vcpu_time_info *pv = (void *)KVMCORE_PVCLOCK_GPA;
	uint32_t version;
	uint64_t tsc;

	for (;;) {
		version = pv->version;
		barrier();
		copy(&r->pvclock, pv, sizeof(*pv));
		tsc = rdtsc();
		barrier();
		if (!(version & 1) && version == pv->version)
			break;
		r->pvclock_retries++;
	}
	r->tsc = tsc;
	r->kvmclock_ns = r->pvclock.system_time +
		pvclock_scale(tsc - r->pvclock.tsc_timestamp,
			      r->pvclock.tsc_to_system_mul, r->pvclock.tsc_shift);
}

/* Same version protocol for the steal-time record (odd while KVM updates it). */
static void read_steal(volatile struct kvmcore_report *r)
{
	const volatile struct kvmcore_steal_time *st = (void *)KVMCORE_STEAL_GPA;
	uint32_t version;

	do {
		version = st->version;
		barrier();
		copy(&r->steal, st, sizeof(*st));
		barrier();
	} while ((version & 1) || version != st->version);
}

/*
 * The runstate area has no version field; KVM writes it only while the vCPU
 * is not in guest mode, so a single-vCPU guest always sees it whole. Zero
 * unless the host configured Xen.
 */
static void read_runstate(volatile struct kvmcore_report *r)
{
	copy(&r->runstate, (const volatile void *)KVMCORE_RUNSTATE_GPA,
	     sizeof(struct kvmcore_runstate_info));
}

#define NSEC_PER_SEC 1000000000ULL

/*
 * The dirtying workload (struct kvmcore_config): spend the bytes earned since
 * the last pass, at dirty_rate per kvmclock second, on whole pages. A pass
 * earns at most one second (a guest paused for a migration does not write a
 * backlog of minutes) and writes each page at most once; a kvmclock that went
 * backwards earns nothing.
 */
static void dirty_pages(volatile struct kvmcore_report *r)
{
	const volatile struct kvmcore_config *c = (void *)KVMCORE_CONFIG_GPA;
	uint64_t pages = c->working_set / KVMCORE_PAGE_SIZE, now = r->kvmclock_ns, delta, n;

	if (!c->dirty_rate || !pages)
		return;
	if (!r->dirty_last_ns || now < r->dirty_last_ns) {
		r->dirty_last_ns = now;
		return;
	}
	delta = now - r->dirty_last_ns;
	r->dirty_last_ns = now;
	if (delta > NSEC_PER_SEC)
		delta = NSEC_PER_SEC;
	r->dirty_credit += c->dirty_rate * delta;
	n = r->dirty_credit / (NSEC_PER_SEC * KVMCORE_PAGE_SIZE);
	r->dirty_credit -= n * NSEC_PER_SEC * KVMCORE_PAGE_SIZE;
	if (n > pages)
		n = pages;
	while (n--) {
		volatile uint64_t *stamp =
			(void *)(KVMCORE_WORKSET_GPA + r->dirty_cursor * KVMCORE_PAGE_SIZE);

		*stamp = ++r->dirty_generation;
		if (++r->dirty_cursor == pages)
			r->dirty_cursor = 0;
	}
}

void guest_main(void)
{
	volatile struct kvmcore_report *r = (void *)KVMCORE_REPORT_GPA;

	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, KVMCORE_PVCLOCK_GPA | 1);
	wrmsr(MSR_KVM_STEAL_TIME, KVMCORE_STEAL_GPA | KVM_MSR_ENABLED);
	r->magic = KVMCORE_REPORT_MAGIC;

	for (;;) {
		r->sequence++;
		read_pvclock(r);
		read_steal(r);
		read_runstate(r);
		if (r->kvmclock_ns < r->last_kvmclock_ns) {
			r->backwards_count++;
			r->backwards_prev_ns = r->last_kvmclock_ns;
			r->backwards_next_ns = r->kvmclock_ns;
		}
		r->last_kvmclock_ns = r->kvmclock_ns;
		dirty_pages(r);
		report(r->sequence);
	}
}
