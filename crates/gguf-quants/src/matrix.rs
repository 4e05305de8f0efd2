//! [`QuantMatrix`]: a GGUF tensor's blocks as they are in the file, and its deterministic
//! matmul kernel (see the crate doc for the operation order).

use std::ops::Range;

use crate::isa::{dispatch, Kernel, Simd};
use crate::{row_bytes, Error, Isa, QuantType, TypeTraits};

/// Most input rows one pass over a weight row handles; more are processed in groups of
/// this many (each output value is computed the same way whatever the grouping).
pub const MAX_GROUP: usize = 8;

/// Elements per tile of the float types (whose "block" is one element).
const FLOAT_TILE: usize = 256;

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
        (self.traits.dequantize)(src, out);
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
                let xg = &x[g * cols..(g + r) * cols];
                let og = &mut out[g..g + r];
                match r {
                    1 => group::<S, 1>(s, m.traits, row, cols, xg, og),
                    2 => group::<S, 2>(s, m.traits, row, cols, xg, og),
                    3 => group::<S, 3>(s, m.traits, row, cols, xg, og),
                    4 => group::<S, 4>(s, m.traits, row, cols, xg, og),
                    5 => group::<S, 5>(s, m.traits, row, cols, xg, og),
                    6 => group::<S, 6>(s, m.traits, row, cols, xg, og),
                    7 => group::<S, 7>(s, m.traits, row, cols, xg, og),
                    _ => group::<S, 8>(s, m.traits, row, cols, xg, og),
                }
                g += r;
            }
        }
    }
}

/// The fixed reduction tree of the 16 lane accumulators.
#[inline(always)]
fn reduce16(a: [f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|l| a[l] + a[l + 8]);
    let s4: [f32; 4] = std::array::from_fn(|l| s8[l] + s8[l + 4]);
    let s2: [f32; 2] = std::array::from_fn(|l| s4[l] + s4[l + 2]);
    s2[0] + s2[1]
}

/// One weight row against `R` input rows (`x`: `[R, cols]`), results into `out[..R]`.
#[inline(always)]
fn group<S: Simd, const R: usize>(
    s: S,
    traits: &TypeTraits,
    row: &[u8],
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let (be, bb) = (traits.block_elems, traits.block_bytes);
    let tile = if be == 1 { FLOAT_TILE } else { be };
    let tile_bytes = tile / be * bb;
    let mut acc = [s.zero(); R];
    let mut buf = [0.0f32; 256];
    let full = cols / tile;
    for t in 0..full {
        let w = &mut buf[..tile];
        s.dequantize(traits, &row[t * tile_bytes..(t + 1) * tile_bytes], w);
        let base = t * tile;
        for c in 0..tile / 16 {
            let wv = s.load(&w[c * 16..]);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = s.fma(wv, s.load(&x[r * cols + base + c * 16..]), *a);
            }
        }
    }
    // The tail of a float row (quantized rows are whole blocks): zero-padded to 16 lanes.
    let base = full * tile;
    let rem = cols - base;
    if rem > 0 {
        let padded = rem.div_ceil(16) * 16;
        buf[..padded].fill(0.0);
        (traits.dequantize)(&row[full * tile_bytes..], &mut buf[..rem]);
        for c in 0..padded / 16 {
            let wv = s.load(&buf[c * 16..]);
            let take = (rem - c * 16).min(16);
            for (r, a) in acc.iter_mut().enumerate() {
                let mut xs = [0.0f32; 16];
                let start = r * cols + base + c * 16;
                xs[..take].copy_from_slice(&x[start..start + take]);
                *a = s.fma(wv, s.load(&xs), *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = reduce16(s.to_array(a));
    }
}
