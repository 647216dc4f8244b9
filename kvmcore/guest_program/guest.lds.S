/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * A flat image loaded at KVMCORE_CODE_GPA; the entry point is its first byte.
 * Preprocessed (cpp -P) so the load address comes from abi.h, as the kernel
 * does with vmlinux.lds.S.
 */
#include "abi.h"

OUTPUT_FORMAT("elf64-x86-64")
ENTRY(_start)
SECTIONS
{
	. = KVMCORE_CODE_GPA;
	.text : { *(.text.entry) *(.text .text.*) }
	.rodata : { *(.rodata .rodata.*) }
	.data : { *(.data .data.*) }
	/* Guest memory starts zeroed, so .bss needs no bytes in the image. */
	.bss : { *(.bss .bss.* COMMON) }
	/DISCARD/ : { *(.comment) *(.note*) *(.eh_frame*) }
}
