"""Bit-level LLVM intrinsics for the Exp-Golomb kernels.

numba exposes no count-leading-zeros, logical shift, unaligned big-endian
load/store or raw loads and stores by address. The bit packer and the table
decoder are built from these; each compiles to one or two machine instructions.

All integers are int64: mixing uint64 and int64 in numba promotes to float64,
which would silently lose bits. ``lshr`` gives the logical right shift that
int64's ``>>`` (arithmetic) does not.
"""

from __future__ import annotations

import sys

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I64 = ir.IntType(64)


def _llvm_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@intrinsic
def clz64(typingctx, x):
    """Leading zero bits of a 64-bit value (64 for zero)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.int64(x)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], x, types.int64)
        fn = _llvm_fn(builder, "llvm.ctlz.i64", _I64, [_I64, ir.IntType(1)])
        return builder.call(fn, [v, cgutils.false_bit])

    return sig, codegen


@intrinsic
def lshr(typingctx, x, s):
    """Logical right shift of the 64 bits of ``x`` by ``s`` (0 <= s < 64)."""
    if not (isinstance(x, types.Integer) and isinstance(s, types.Integer)):
        return None
    sig = types.int64(x, s)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], x, types.int64)
        n = context.cast(builder, args[1], s, types.int64)
        return builder.lshr(v, n)

    return sig, codegen


@intrinsic
def data_ptr(typingctx, arr):
    """Address of a contiguous array's first element, as int64.

    Hot loops take this address instead of the array: numba reference-counts arrays
    passed between functions, and those atomic counts cost more than the loop body.
    The caller keeps the array alive.
    """
    if not isinstance(arr, types.Array):
        return None
    sig = types.int64(arr)

    def codegen(context, builder, signature, args):
        ary = context.make_array(arr)(context, builder, args[0])
        return builder.ptrtoint(ary.data, _I64)

    return sig, codegen


def _byte_ptr(builder, base, idx):
    return builder.inttoptr(builder.add(base, idx), ir.IntType(8).as_pointer())


@intrinsic
def load_u8(typingctx, ptr, idx):
    """The byte at address ptr + idx."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        v = builder.load(_byte_ptr(builder, args[0], args[1]))
        return builder.zext(v, _I64)

    return sig, codegen


@intrinsic
def load_be64(typingctx, ptr, idx):
    """The 8 bytes at address ptr + idx as a big-endian int64 (unaligned load).

    The caller guarantees the 8 bytes are inside the buffer.
    """
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p64 = builder.bitcast(_byte_ptr(builder, args[0], args[1]), _I64.as_pointer())
        v = builder.load(p64, align=1)
        fn = _llvm_fn(builder, "llvm.bswap.i64", _I64, [_I64])
        return builder.call(fn, [v])

    return sig, codegen


@intrinsic
def load_le64(typingctx, ptr, idx):
    """The little-endian uint64 at address ptr + idx, as int64 (any alignment)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p64 = builder.bitcast(_byte_ptr(builder, args[0], args[1]), _I64.as_pointer())
        v = builder.load(p64, align=1)
        if sys.byteorder == "big":
            fn = _llvm_fn(builder, "llvm.bswap.i64", _I64, [_I64])
            v = builder.call(fn, [v])
        return v

    return sig, codegen


@intrinsic
def load_i64(typingctx, ptr, idx):
    """The native-endian int64 at address ptr + idx (8-byte aligned: table entries)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p64 = builder.bitcast(_byte_ptr(builder, args[0], args[1]), _I64.as_pointer())
        return builder.load(p64, align=8)

    return sig, codegen


@intrinsic
def store_i32(typingctx, ptr, idx, val):
    """Store the low 32 bits of val, native-endian, at address ptr + idx (4-byte aligned).

    The caller guarantees the 4 bytes are inside the buffer.
    """
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        p32 = builder.bitcast(_byte_ptr(builder, args[0], args[1]), i32.as_pointer())
        builder.store(builder.trunc(args[2], i32), p32, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_be64(typingctx, ptr, idx, val):
    """Store the 64 bits of val big-endian at address ptr + idx (unaligned).

    The caller guarantees the 8 bytes are inside the buffer.
    """
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fn = _llvm_fn(builder, "llvm.bswap.i64", _I64, [_I64])
        p64 = builder.bitcast(_byte_ptr(builder, args[0], args[1]), _I64.as_pointer())
        builder.store(builder.call(fn, [args[2]]), p64, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f64_bits(typingctx, x):
    """The IEEE 754 bit pattern of a float64, as int64 (a bitcast, no instruction)."""
    if not isinstance(x, types.Float):
        return None
    sig = types.int64(x)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], x, types.float64)
        return builder.bitcast(v, _I64)

    return sig, codegen


@intrinsic
def f64_from_bits(typingctx, x):
    """The float64 whose IEEE 754 bit pattern is the int64 x."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.float64(x)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[0], x, types.int64)
        return builder.bitcast(v, ir.DoubleType())

    return sig, codegen


@intrinsic
def store_u16x4_i32(typingctx, ptr, idx, val):
    """Store the four 16-bit fields of val (lowest first), each zero-extended to int32, as
    four native-endian int32 at address ptr + idx (16 bytes, 4-byte aligned): on x86-64
    one widening move and one vector store.

    The caller guarantees the 16 bytes are inside the buffer.
    """
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i16, i32 = ir.IntType(16), ir.IntType(32)
        vec = ir.Constant(ir.VectorType(i16, 4), ir.Undefined)
        for lane in range(4):
            field = builder.trunc(builder.lshr(args[2], ir.Constant(_I64, 16 * lane)), i16)
            vec = builder.insert_element(vec, field, ir.Constant(i32, lane))
        wide = builder.zext(vec, ir.VectorType(i32, 4))
        p = builder.bitcast(_byte_ptr(builder, args[0], args[1]),
                            ir.VectorType(i32, 4).as_pointer())
        builder.store(wide, p, align=4)
        return context.get_dummy_value()

    return sig, codegen
