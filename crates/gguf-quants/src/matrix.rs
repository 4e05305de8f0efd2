//! [`QuantMatrix`]: a GGUF tensor's blocks as they are in the file, and its deterministic
//! matmul kernel (see the crate doc for the operation order).

use std::ops::Range;

use crate::isa::{dispatch, Kernel, Simd, Sink};
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

/// Vectors of 16 lanes per accumulator: element `i` of a row goes to lane `i % 32`, that
/// is lane `i % 16` of vector `(i / 16) % 2` (two independent FMA chains per row).
const CHAINS: usize = 2;

/// The fixed reduction tree of the 32 lane accumulators: lanes `l` and `l + 16` first,
/// then `l + 8`, `l + 4`, `l + 2`, `l + 1`.
#[inline(always)]
fn reduce32(lo: [f32; 16], hi: [f32; 16]) -> f32 {
    let a: [f32; 16] = std::array::from_fn(|l| lo[l] + hi[l]);
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
    let mut acc = [[s.zero(); CHAINS]; R];
    let mut buf = [0.0f32; 256];
    let full = cols / tile;
    for t in 0..full {
        let base = t * tile;
        let block = &row[t * tile_bytes..(t + 1) * tile_bytes];
        let mut sink = FmaSink {
            s,
            acc: &mut acc,
            x,
            cols,
            base,
        };
        s.for_each_vector(traits, block, &mut buf[..tile], &mut sink);
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
                // `base` is a multiple of 32 (a float tile): vector `c` goes to chain `c % 2`.
                let a = &mut a[c % CHAINS];
                *a = s.fma(wv, s.load(&xs), *a);
            }
        }
    }
    for (o, [lo, hi]) in out.iter_mut().zip(acc) {
        *o = reduce32(s.to_array(lo), s.to_array(hi));
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
        let (be, bb) = (self.traits.block_elems, self.traits.block_bytes);
        let tile = if be == 1 { FLOAT_TILE } else { be };
        let tile_bytes = tile / be * bb;
        let mut src = self.src.chunks_exact(tile_bytes);
        let mut dst = self.dst.chunks_exact_mut(tile);
        let mut buf = [0.0f32; 256];
        for (b, o) in (&mut src).zip(&mut dst) {
            s.for_each_vector(
                self.traits,
                b,
                &mut buf[..o.len()],
                &mut StoreSink { s, out: o },
            );
        }
        (self.traits.dequantize)(src.remainder(), dst.into_remainder());
    }
}

/// Accumulates each weight vector against the `R` input rows (the kernel's inner loop).
struct FmaSink<'a, S: Simd, const R: usize> {
    s: S,
    acc: &'a mut [[S::V; CHAINS]; R],
    x: &'a [f32],
    cols: usize,
    base: usize,
}

impl<S: Simd, const R: usize> Sink<S::V> for &mut FmaSink<'_, S, R> {
    #[inline(always)]
    fn put(&mut self, c: usize, w: S::V) {
        let s = self.s;
        // Blocks and float tiles hold a multiple of 32 elements: vector `c` of a block is
        // element group `(base / 16 + c)`, whose chain is `c % 2`.
        for (r, a) in self.acc.iter_mut().enumerate() {
            let a = &mut a[c % CHAINS];
            *a = s.fma(w, s.load(&self.x[r * self.cols + self.base + c * 16..]), *a);
        }
    }
}

/// Stores each weight vector (dequantization through the kernels' code path).
struct StoreSink<'a, S: Simd> {
    s: S,
    out: &'a mut [f32],
}

impl<S: Simd> Sink<S::V> for &mut StoreSink<'_, S> {
    #[inline(always)]
    fn put(&mut self, c: usize, w: S::V) {
        self.out[c * 16..c * 16 + 16].copy_from_slice(&self.s.to_array(w));
    }
}
