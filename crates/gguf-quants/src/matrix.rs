//! [`QuantMatrix`]: a GGUF tensor's blocks as they are in the file, and its deterministic
//! matmul kernel (see the crate doc for the operation order).

use std::ops::Range;

use crate::isa::{dispatch, Kernel, Simd};
use crate::{row_bytes, Error, Isa, QuantType, TypeTraits};

/// Most input rows one pass over a weight row handles (4 rows × 4 accumulator chains fill
/// half the AVX-512 registers); more are processed in groups of this many (each output
/// value is computed the same way whatever the grouping).
pub const MAX_GROUP: usize = 4;

/// A `[rows = out_features, cols = in_features]` matrix of `ty` blocks, row-major (each row
/// `cols / block_elems` blocks): exactly the bytes of the GGUF tensor, no repacking, so it
/// takes the same memory as in the file.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    ty: QuantType,
    traits: &'static TypeTraits,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    /// Wraps a tensor's bytes; checks that the type is supported, that `cols` is a whole
    /// number of blocks and that `data` holds exactly `rows` rows.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, Error> {
        let traits = ty.traits().ok_or(Error::Unsupported(ty))?;
        let row_bytes = row_bytes(ty, cols)?;
        let expected = row_bytes.checked_mul(rows).ok_or(Error::Overflow)?;
        if data.len() != expected {
            return Err(Error::Length {
                what: "matrix data bytes",
                expected,
                actual: data.len(),
            });
        }
        Ok(QuantMatrix {
            ty,
            traits,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// The block type.
    pub fn ty(&self) -> QuantType {
        self.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of the blocks (the tensor's size in the file).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    fn check_rows(&self, rows: &Range<usize>) -> Result<(), Error> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(Error::RowRange {
                start: rows.start,
                end: rows.end,
                rows: self.rows,
            });
        }
        Ok(())
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`), bit-exact against gguf-py.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), Error> {
        self.dequantize_rows(r..r + 1, out)
    }

    /// Dequantizes `rows` into `out`, `[rows.len(), cols]` row-major.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<(), Error> {
        self.check_rows(&rows)?;
        let expected = rows.len() * self.cols;
        if out.len() != expected {
            return Err(Error::Length {
                what: "dequantize output",
                expected,
                actual: out.len(),
            });
        }
        let src = &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes];
        // The detected instruction set's decoders: the reference's bits (tested per ISA),
        // several times faster than the scalar reference.
        dispatch(
            Isa::detected(),
            Dequantize {
                traits: self.traits,
                src,
                dst: out,
            },
        );
        Ok(())
    }

    /// `yt[(o - range.start) * n + r] = Σ_i W[o,i] · x[r*cols + i]` for `r in 0..n`,
    /// `o in range`: the product of `n ≥ 1` input rows (`x`, `[n, cols]` row-major) with the
    /// weight rows `range`, written transposed (`yt`, `[range.len(), n]`).
    ///
    /// Each value is computed by the same float operations whatever `n`, the row's
    /// position, the range and `isa` (see the crate doc); `isa` must be supported.
    pub fn matmul_transposed(
        &self,
        isa: Isa,
        x: &[f32],
        n: usize,
        range: Range<usize>,
        yt: &mut [f32],
    ) -> Result<(), Error> {
        if !isa.supported() {
            return Err(Error::IsaUnavailable(isa.name()));
        }
        if n == 0 {
            return Err(Error::NoInputRows);
        }
        self.check_rows(&range)?;
        let x_len = n.checked_mul(self.cols).ok_or(Error::Overflow)?;
        if x.len() != x_len {
            return Err(Error::Length {
                what: "matmul input x",
                expected: x_len,
                actual: x.len(),
            });
        }
        let y_len = range.len().checked_mul(n).ok_or(Error::Overflow)?;
        if yt.len() != y_len {
            return Err(Error::Length {
                what: "matmul output yt",
                expected: y_len,
                actual: yt.len(),
            });
        }
        dispatch(
            isa,
            Matmul {
                m: self,
                x,
                n,
                range,
                yt,
            },
        );
        Ok(())
    }
}

/// One `matmul_transposed` call, as a kernel to compile per instruction set.
struct Matmul<'a> {
    m: &'a QuantMatrix,
    x: &'a [f32],
    n: usize,
    range: Range<usize>,
    yt: &'a mut [f32],
}

impl Kernel for Matmul<'_> {
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let Matmul { m, x, n, range, yt } = self;
        let cols = m.cols;
        for (o, out) in range.zip(yt.chunks_exact_mut(n)) {
            let row = &m.data[o * m.row_bytes..(o + 1) * m.row_bytes];
            let mut g = 0;
            while g < n {
                let r = (n - g).min(MAX_GROUP);
                let og = &mut out[g..g + r];
                let xr = |k: usize| &x[(g + k) * cols..(g + k + 1) * cols];
                match r {
                    1 => og.copy_from_slice(&s.dot(m.traits, row, [xr(0)])),
                    2 => og.copy_from_slice(&s.dot(m.traits, row, [xr(0), xr(1)])),
                    3 => og.copy_from_slice(&s.dot(m.traits, row, [xr(0), xr(1), xr(2)])),
                    _ => og.copy_from_slice(&s.dot(m.traits, row, [xr(0), xr(1), xr(2), xr(3)])),
                }
                g += r;
            }
        }
    }
}

/// Dequantizes whole blocks of `ty` (as [`TypeTraits::dequantize`]) with the kernels'
/// `isa` code path: the same bits, exposed so that tests can check every path against the
/// reference.
pub fn dequantize_with(isa: Isa, ty: QuantType, src: &[u8], dst: &mut [f32]) -> Result<(), Error> {
    let traits = ty.traits().ok_or(Error::Unsupported(ty))?;
    if !isa.supported() {
        return Err(Error::IsaUnavailable(isa.name()));
    }
    let blocks = src.len() / traits.block_bytes;
    if blocks * traits.block_bytes != src.len() {
        return Err(Error::Length {
            what: "dequantize input bytes (whole blocks)",
            expected: (blocks + 1) * traits.block_bytes,
            actual: src.len(),
        });
    }
    if dst.len() != blocks * traits.block_elems {
        return Err(Error::Length {
            what: "dequantize output",
            expected: blocks * traits.block_elems,
            actual: dst.len(),
        });
    }
    dispatch(isa, Dequantize { traits, src, dst });
    Ok(())
}

/// One `dequantize_with` call, as a kernel to compile per instruction set.
struct Dequantize<'a> {
    traits: &'static TypeTraits,
    src: &'a [u8],
    dst: &'a mut [f32],
}

impl Kernel for Dequantize<'_> {
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        s.dequant(self.traits, self.src, self.dst);
    }
}
