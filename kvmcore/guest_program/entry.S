/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * First instruction of the guest. The host enters here already in 64-bit
 * long mode (CR0/CR4/EFER, page tables and GDT prepared as the KVM selftests
 * do), so all that is left is a stack for the C code.
 */
#include "abi.h"

	.section .text.entry, "ax"
	.globl _start
_start:
	mov	$KVMCORE_STACK_TOP, %rsp
	call	guest_main
	/* guest_main never returns; if it did, park the vCPU visibly. */
1:	hlt
	jmp	1b

	/* No executable stack: this object is linked into a flat image. */
	.section .note.GNU-stack, "", @progbits
