//! Linear layers over block-quantized weights, computed on the host CPU (decode steps).
//!
//! Why: with MLX's CPU backend a decode step multiplies one row (or a few) by every weight
//! matrix in f32 through OpenBLAS, so each token streams the whole model as f32 (4 bytes a
//! weight) and the step is memory-bound. This kernel reads the GGUF's 4-bit (Q4_0, Q4_1, MLX
//! 4-bit) or 8-bit (Q8_0, MLX 8-bit) blocks directly, 0.75 or 1.25 bytes a weight, and
//! converts them to f32 in registers (AVX-512 or AVX2+FMA, chosen at run time, with a
//! portable scalar fallback).
//!
//! The weights are kept per output feature as blocks of 32: `w = q × d + m` with `q` in
//! `0..2^bits`. Each block is dequantized once in registers (`q × d + m` as one fused
//! multiply-add per lane) and used for every input row of the call: `y_r += w · x_r`.
//!
//! Determinism: every output value is computed by one thread, by exactly the same sequence of
//! floating-point operations whatever the number of rows in the call, the row's position
//! among them and the split of the outputs across threads (a batched decode step gives each
//! sequence the bits it gets alone). Only the instruction set (fixed for a process) chooses
//! the summation order.

// SIMD intrinsics take raw pointers; every unsafe block below reads within slices whose
// lengths are checked before the kernels run.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::OnceLock;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// Most rows one kernel pass handles (more are processed in groups of this many).
pub const MAX_ROWS: usize = 8;

/// The instruction set the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F (16 lanes).
    Avx512,
    /// x86-64 AVX2 with FMA (8 lanes).
    Avx2,
    /// Plain Rust (any CPU).
    Scalar,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once per process).
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }

    /// Short name for logs and the model descriptor.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A `[out_features, in_features]` weight matrix in blocks of 32 along the input axis, each
/// block `w = d × q + m` with `bits`-bit codes `q` (4 or 8).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    bits: u32,
    out_features: usize,
    in_features: usize,
    /// Blocks, per output feature then along the input axis, each one record read as a
    /// single stream: `d` (f32 LE), `m` (f32 LE), then the codes: 16 bytes a 4-bit block
    /// (element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble, as in
    /// GGUF), 32 bytes an 8-bit block (one byte per element).
    data: Vec<u8>,
}

/// The codes of one block of [`BLOCK`] elements, `BITS`-bit codes packed little-endian into
/// `ws`, in the record layout (4-bit: element `j` in the low nibble of byte `j`, element
/// `j + 16` in its high nibble; 8-bit: a byte each).
fn pack_block<const BITS: u32>(ws: &[u32], dst: &mut [u8]) {
    let per_word = (32 / BITS) as usize;
    let mask = (1u32 << BITS) - 1;
    let code = |e: usize| ((ws[e / per_word] >> ((e % per_word) as u32 * BITS)) & mask) as u8;
    if BITS == 4 {
        for (j, byte) in dst.iter_mut().enumerate() {
            *byte = code(j) | (code(j + 16) << 4);
        }
    } else {
        for (j, byte) in dst.iter_mut().enumerate() {
            *byte = code(j);
        }
    }
}

/// Bytes of a block record's header (`d` and `m`, f32 each).
const HEADER: usize = 8;

fn invalid(reason: impl Into<String>) -> Error {
    Error::HostKernel(reason.into())
}

impl PackedMatrix {
    /// Converts MLX affine quantization (`w = scale × q + bias` per group of `group_size`
    /// elements, `bits`-bit codes packed little-endian into `u32` words, first element in the
    /// lowest bits) of a `[out_features, in_features]` matrix. `group_size` must be a multiple
    /// of 32 and `bits` 4 or 8; `words`, `scales` and `biases` are row-major.
    pub fn from_affine(
        bits: u32,
        group_size: usize,
        out_features: usize,
        in_features: usize,
        words: &[u32],
        scales: &[f32],
        biases: &[f32],
    ) -> Result<Self> {
        if bits != 4 && bits != 8 {
            return Err(invalid(format!("{bits}-bit codes (supported: 4, 8)")));
        }
        if group_size == 0
            || !group_size.is_multiple_of(BLOCK)
            || !in_features.is_multiple_of(group_size)
        {
            return Err(invalid(format!(
                "group size {group_size} for {in_features} inputs (needs a multiple of {BLOCK} \
                 dividing the input size)"
            )));
        }
        let per_word = (32 / bits) as usize;
        let row_words = in_features / per_word;
        let groups = in_features / group_size;
        let blocks = in_features / BLOCK;
        let cells = out_features
            .checked_mul(in_features)
            .ok_or_else(|| invalid("matrix too large"))?;
        if words.len() != cells / per_word
            || scales.len() != out_features * groups
            || biases.len() != out_features * groups
        {
            return Err(invalid(format!(
                "{out_features}x{in_features} matrix with {} words, {} scales, {} biases",
                words.len(),
                scales.len(),
                biases.len()
            )));
        }
        let block_bytes = bits as usize * BLOCK / 8;
        let record = HEADER + block_bytes;
        let mut data = vec![0u8; out_features * blocks * record];
        // Output rows `o0..` into `dst` (whole rows of records).
        let fill = |o0: usize, dst: &mut [u8]| {
            for (r, recs) in dst.chunks_exact_mut(blocks * record).enumerate() {
                let o = o0 + r;
                let row = &words[o * row_words..][..row_words];
                for (b, rec) in recs.chunks_exact_mut(record).enumerate() {
                    let (head, codes) = rec.split_at_mut(HEADER);
                    let g = o * groups + b * BLOCK / group_size;
                    head[..4].copy_from_slice(&scales[g].to_le_bytes());
                    head[4..].copy_from_slice(&biases[g].to_le_bytes());
                    let ws = &row[b * BLOCK / per_word..][..BLOCK / per_word];
                    if bits == 4 {
                        pack_block::<4>(ws, codes);
                    } else {
                        pack_block::<8>(ws, codes);
                    }
                }
            }
        };
        let rows = out_features.div_ceil(threads()).max(1);
        for_each_piece(&mut data, rows * blocks * record, |k, dst| {
            fill(k * rows, dst)
        });
        Ok(PackedMatrix {
            bits,
            out_features,
            in_features,
            data,
        })
    }

    /// Stacks matrices with the same input size and code width along the output axis (fused
    /// q/k/v or gate/up projections).
    pub fn concat(parts: Vec<PackedMatrix>) -> Result<Self> {
        let mut it = parts.into_iter();
        let mut all = it
            .next()
            .ok_or_else(|| invalid("no matrices to concatenate"))?;
        for p in it {
            if p.bits != all.bits || p.in_features != all.in_features {
                return Err(invalid(format!(
                    "concatenating a {}-bit matrix of {} inputs to a {}-bit one of {}",
                    p.bits, p.in_features, all.bits, all.in_features
                )));
            }
            all.out_features += p.out_features;
            all.data.extend_from_slice(&p.data);
        }
        Ok(all)
    }

    /// Output features (rows of the weight matrix).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns of the weight matrix).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bits per code (4 or 8).
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Host memory held, in bytes.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    fn blocks(&self) -> usize {
        self.in_features / BLOCK
    }

    fn record(&self) -> usize {
        HEADER + self.bits as usize * BLOCK / 8
    }

    /// The weight at (`o`, `i`), dequantized (tests and references).
    pub fn weight(&self, o: usize, i: usize) -> f32 {
        let (b, j) = (i / BLOCK, i % BLOCK);
        let rec = &self.data[(o * self.blocks() + b) * self.record()..][..self.record()];
        let (d, m, block) = split_record(rec);
        let q = if self.bits == 4 {
            if j < 16 {
                block[j] & 0x0f
            } else {
                block[j - 16] >> 4
            }
        } else {
            block[j]
        };
        d * f32::from(q) + m
    }

    /// Row `o` of the matrix (output feature `o`, all inputs), dequantized into `out`
    /// (`in_features` values): an embedding lookup from a tied table.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) -> Result<()> {
        if o >= self.out_features || out.len() != self.in_features {
            return Err(invalid(format!(
                "row {o} of {} into {} values ({} expected)",
                self.out_features,
                out.len(),
                self.in_features
            )));
        }
        let record = self.record();
        let blocks = &self.data[o * self.blocks() * record..][..self.blocks() * record];
        for (rec, dst) in blocks.chunks_exact(record).zip(out.chunks_exact_mut(BLOCK)) {
            let (d, m, codes) = split_record(rec);
            for (j, v) in dst.iter_mut().enumerate() {
                let q = if self.bits == 4 {
                    if j < 16 {
                        codes[j] & 0x0f
                    } else {
                        codes[j - 16] >> 4
                    }
                } else {
                    codes[j]
                };
                *v = d * f32::from(q) + m;
            }
        }
        Ok(())
    }

    /// `y = x Wᵀ` for `rows` input rows: `x` is `[rows, in_features]` and `y`
    /// `[rows, out_features]`, both row-major. Splits the outputs across the host pool's
    /// threads when the product is large enough; results never depend on that split.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let parts = if rows * self.out_features * self.in_features < PARALLEL_MIN_MACS {
            1
        } else {
            pool().map_or(1, |p| p.current_num_threads() + 1)
        };
        self.matmul_with(Isa::detected(), parts, x, rows, y)
    }

    /// [`PackedMatrix::matmul`] with a given instruction set (which must be
    /// [`Isa::supported`]) and the outputs split in `parts` ranges (tests and benchmarks).
    pub fn matmul_with(
        &self,
        isa: Isa,
        parts: usize,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
    ) -> Result<()> {
        if !isa.supported() {
            return Err(invalid(format!("this CPU does not support {}", isa.name())));
        }
        if x.len() != rows * self.in_features || y.len() != rows * self.out_features {
            return Err(invalid(format!(
                "{rows} rows: input of {} values for {} features, output of {} for {}",
                x.len(),
                self.in_features,
                y.len(),
                self.out_features
            )));
        }
        let (n_in, n_out) = (self.in_features, self.out_features);
        if n_out == 0 || rows == 0 {
            return Ok(());
        }
        // Rows per kernel pass: as many as the registers hold accumulators for.
        let group = match isa {
            Isa::Avx512 => MAX_ROWS,
            Isa::Avx2 | Isa::Scalar => MAX_ROWS / 2,
        };
        let parts = parts.clamp(1, n_out);
        let mut yt = vec![0.0f32; group.min(rows) * n_out];
        for r0 in (0..rows).step_by(group) {
            let n = (rows - r0).min(group);
            let xs = &x[r0 * n_in..(r0 + n) * n_in];
            let yt = &mut yt[..n * n_out];
            // Contiguous output ranges, multiples of 16 features (one range per thread).
            let chunk = n_out.div_ceil(parts).div_ceil(16) * 16;
            let job = |o0: usize, out: &mut [f32]| {
                let range = o0..o0 + out.len() / n;
                self.kernel(isa, n, xs, range, out);
            };
            for_each_piece(yt, chunk * n, |i, out| job(i * chunk, out));
            // `yt` is [outputs, rows]: transpose into y.
            for (o, vals) in yt.chunks_exact(n).enumerate() {
                for (r, &v) in vals.iter().enumerate() {
                    y[(r0 + r) * n_out + o] = v;
                }
            }
        }
        Ok(())
    }

    /// Outputs `range` for `n` rows (1..=MAX_ROWS) into `yt` (`[range.len(), n]`).
    fn kernel(&self, isa: Isa, n: usize, x: &[f32], range: Range<usize>, yt: &mut [f32]) {
        macro_rules! rows {
            ($f:ident, $bits:literal) => {
                match n {
                    1 => $f::<1, $bits>(self, x, range, yt),
                    2 => $f::<2, $bits>(self, x, range, yt),
                    3 => $f::<3, $bits>(self, x, range, yt),
                    4 => $f::<4, $bits>(self, x, range, yt),
                    5 => $f::<5, $bits>(self, x, range, yt),
                    6 => $f::<6, $bits>(self, x, range, yt),
                    7 => $f::<7, $bits>(self, x, range, yt),
                    _ => $f::<8, $bits>(self, x, range, yt),
                }
            };
        }
        macro_rules! bits {
            ($f:ident) => {
                if self.bits == 4 {
                    rows!($f, 4)
                } else {
                    rows!($f, 8)
                }
            };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => bits!(avx512_entry),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => bits!(avx2_entry),
            _ => bits!(scalar_rows),
        }
    }

    /// Checks the invariants the kernels' pointer arithmetic relies on.
    fn check_kernel_args(&self, rows: usize, x: &[f32], range: &Range<usize>, yt: &[f32]) {
        let blocks = self.blocks();
        assert!(blocks * BLOCK == self.in_features && x.len() >= rows * self.in_features);
        assert!(range.end <= self.out_features && yt.len() >= range.len() * rows);
        assert!(self.data.len() >= self.out_features * blocks * self.record());
    }
}

/// Below this many multiply-adds a call runs on the calling thread alone (waking a helper
/// costs more than it saves).
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// The host kernels' helper threads (`cores - 1`; none on one core), shared with the host
/// decode step's attention ([`crate::host_decode`]).
pub(crate) fn helper_pool() -> Option<&'static rayon::ThreadPool> {
    pool()
}

/// Threads a split job runs on: the calling thread and the helpers.
pub(crate) fn threads() -> usize {
    pool().map_or(1, |p| p.current_num_threads() + 1)
}

/// Runs `job(k, piece)` for each piece `k` of `data` cut into pieces of `piece_len` elements
/// (the last may be shorter): the first on the calling thread, the others on the helper
/// threads (all on the calling thread when there are none).
pub(crate) fn for_each_piece<T: Send>(
    data: &mut [T],
    piece_len: usize,
    job: impl Fn(usize, &mut [T]) + Sync,
) {
    let piece_len = piece_len.max(1);
    match pool() {
        Some(pool) if data.len() > piece_len => pool.in_place_scope(|s| {
            let job = &job;
            let mut pieces = data.chunks_mut(piece_len).enumerate();
            let first = pieces.next();
            for (k, piece) in pieces {
                s.spawn(move |_| job(k, piece));
            }
            if let Some((_, piece)) = first {
                job(0, piece);
            }
        }),
        _ => {
            for (k, piece) in data.chunks_mut(piece_len).enumerate() {
                job(k, piece);
            }
        }
    }
}

/// [`for_each_piece`] with a fallible job: the first error any piece reports (the other
/// pieces still run).
pub(crate) fn try_for_each_piece<T: Send, E: Send>(
    data: &mut [T],
    piece_len: usize,
    job: impl Fn(usize, &mut [T]) -> std::result::Result<(), E> + Sync,
) -> std::result::Result<(), E> {
    let failed = std::sync::Mutex::new(None);
    for_each_piece(data, piece_len, |k, piece| {
        if let Err(e) = job(k, piece) {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The helper threads: the calling thread plus `cores - 1` helpers (none on one core).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores - 1)
            .thread_name(|i| format!("host-linear-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// `(d, m, codes)` of a block record.
fn split_record(rec: &[u8]) -> (f32, f32, &[u8]) {
    let f = |i: usize| f32::from_le_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
    (f(0), f(4), &rec[HEADER..])
}

/// The portable kernel: per block `w_j = q_j × d + m`, `acc += w_j × x_j` in element order.
fn scalar_rows<const R: usize, const BITS: u32>(
    w: &PackedMatrix,
    x: &[f32],
    range: Range<usize>,
    yt: &mut [f32],
) {
    w.check_kernel_args(R, x, &range, yt);
    let (n_in, blocks, rl) = (w.in_features, w.blocks(), w.record());
    for (o, out) in range.zip(yt.chunks_exact_mut(R)) {
        let recs = &w.data[o * blocks * rl..][..blocks * rl];
        let mut acc = [0.0f32; R];
        for (b, rec) in recs.chunks_exact(rl).enumerate() {
            let (d, m, block) = split_record(rec);
            let mut wb = [0.0f32; BLOCK];
            if BITS == 4 {
                for (j, &byte) in block.iter().enumerate() {
                    wb[j] = f32::from(byte & 0x0f) * d + m;
                    wb[j + 16] = f32::from(byte >> 4) * d + m;
                }
            } else {
                for (j, &byte) in block.iter().enumerate() {
                    wb[j] = f32::from(byte) * d + m;
                }
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = &x[r * n_in + b * BLOCK..][..BLOCK];
                *a = wb.iter().zip(xb).fold(*a, |a, (&w, &v)| a + w * v);
            }
        }
        out.copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_entry<const R: usize, const BITS: u32>(
    w: &PackedMatrix,
    x: &[f32],
    range: Range<usize>,
    yt: &mut [f32],
) {
    w.check_kernel_args(R, x, &range, yt);
    // SAFETY: only reached with `Isa::Avx512`, which `matmul_with` checked is supported; the
    // lengths the kernel reads within were checked just above.
    unsafe { x86::avx512_rows::<R, BITS>(w, x, range, yt) }
}

#[cfg(target_arch = "x86_64")]
fn avx2_entry<const R: usize, const BITS: u32>(
    w: &PackedMatrix,
    x: &[f32],
    range: Range<usize>,
    yt: &mut [f32],
) {
    w.check_kernel_args(R, x, &range, yt);
    // SAFETY: only reached with `Isa::Avx2`, which `matmul_with` checked is supported; the
    // lengths the kernel reads within were checked just above.
    unsafe { x86::avx2_rows::<R, BITS>(w, x, range, yt) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedMatrix, BLOCK, HEADER};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// How far ahead of the block being read the kernels prefetch, in bytes.
    const PREFETCH: usize = 2048;

    /// AVX-512: per block the 32 weights become two 16-lane vectors `w = q × d + m` (lanes
    /// `0..16` and `16..32`); per row two accumulators, `acc_lo += w_lo × x_lo` and
    /// `acc_hi += w_hi × x_hi`; at the end `Σ lanes(acc_lo + acc_hi)`.
    ///
    /// # Safety
    /// [`PackedMatrix::check_kernel_args`] must hold for `R` rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_rows<const R: usize, const BITS: u32>(
        w: &PackedMatrix,
        x: &[f32],
        range: Range<usize>,
        yt: &mut [f32],
    ) {
        let (n_in, blocks) = (w.in_features, w.blocks());
        let rl = HEADER + BITS as usize * BLOCK / 8;
        let nibble = _mm_set1_epi8(0x0f);
        let xp = x.as_ptr();
        for (o, out) in range.zip(yt.chunks_exact_mut(R)) {
            let mut lo_acc = [_mm512_setzero_ps(); R];
            let mut hi_acc = [_mm512_setzero_ps(); R];
            // SAFETY: output `o` < out_features owns `blocks × bb` code bytes and `blocks`
            // scales and mins; each row of `x` holds `blocks × 32` floats (caller's contract).
            unsafe {
                let rp = w.data.as_ptr().add(o * blocks * rl);
                for b in 0..blocks {
                    let r = rp.add(b * rl);
                    // Past page boundaries, where the hardware prefetcher stops (the pointer
                    // is never read; prefetches do not fault).
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(PREFETCH).cast());
                    let c = r.add(HEADER);
                    let (lo, hi) = if BITS == 4 {
                        let raw = _mm_loadu_si128(c.cast());
                        let l = _mm_and_si128(raw, nibble);
                        let h = _mm_and_si128(_mm_srli_epi16::<4>(raw), nibble);
                        (_mm512_cvtepu8_epi32(l), _mm512_cvtepu8_epi32(h))
                    } else {
                        let l = _mm_loadu_si128(c.cast());
                        let h = _mm_loadu_si128(c.add(16).cast());
                        (_mm512_cvtepu8_epi32(l), _mm512_cvtepu8_epi32(h))
                    };
                    let d = _mm512_set1_ps(r.cast::<f32>().read_unaligned());
                    let m = _mm512_set1_ps(r.add(4).cast::<f32>().read_unaligned());
                    let wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m);
                    let wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m);
                    for r in 0..R {
                        let p = xp.add(r * n_in + b * BLOCK);
                        lo_acc[r] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(p), lo_acc[r]);
                        hi_acc[r] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(p.add(16)), hi_acc[r]);
                    }
                }
            }
            for ((dst, l), h) in out.iter_mut().zip(lo_acc).zip(hi_acc) {
                *dst = _mm512_reduce_add_ps(_mm512_add_ps(l, h));
            }
        }
    }

    /// Sum of the 8 lanes in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// AVX2: as [`avx512_rows`] with four 8-lane vectors per block, two per accumulator
    /// (`acc_lo` gets elements `0..16`, `acc_hi` elements `16..32`).
    ///
    /// # Safety
    /// [`PackedMatrix::check_kernel_args`] must hold for `R` rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_rows<const R: usize, const BITS: u32>(
        w: &PackedMatrix,
        x: &[f32],
        range: Range<usize>,
        yt: &mut [f32],
    ) {
        let (n_in, blocks) = (w.in_features, w.blocks());
        let rl = HEADER + BITS as usize * BLOCK / 8;
        let nibble = _mm_set1_epi8(0x0f);
        let xp = x.as_ptr();
        for (o, out) in range.zip(yt.chunks_exact_mut(R)) {
            let mut lo_acc = [_mm256_setzero_ps(); R];
            let mut hi_acc = [_mm256_setzero_ps(); R];
            // SAFETY: as in `avx512_rows`.
            unsafe {
                let rp = w.data.as_ptr().add(o * blocks * rl);
                for b in 0..blocks {
                    let r = rp.add(b * rl);
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(PREFETCH).cast());
                    let c = r.add(HEADER);
                    let (l, h) = if BITS == 4 {
                        let raw = _mm_loadu_si128(c.cast());
                        (
                            _mm_and_si128(raw, nibble),
                            _mm_and_si128(_mm_srli_epi16::<4>(raw), nibble),
                        )
                    } else {
                        (_mm_loadu_si128(c.cast()), _mm_loadu_si128(c.add(16).cast()))
                    };
                    let d = _mm256_set1_ps(r.cast::<f32>().read_unaligned());
                    let m = _mm256_set1_ps(r.add(4).cast::<f32>().read_unaligned());
                    let dq = |v: __m128i| {
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, m)
                    };
                    let w = [
                        dq(l),
                        dq(_mm_srli_si128::<8>(l)),
                        dq(h),
                        dq(_mm_srli_si128::<8>(h)),
                    ];
                    for r in 0..R {
                        let p = xp.add(r * n_in + b * BLOCK);
                        let a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(p), lo_acc[r]);
                        lo_acc[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(p.add(8)), a);
                        let a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(p.add(16)), hi_acc[r]);
                        hi_acc[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(p.add(24)), a);
                    }
                }
            }
            for ((dst, l), h) in out.iter_mut().zip(lo_acc).zip(hi_acc) {
                *dst = hsum256(_mm256_add_ps(l, h));
            }
        }
    }
}

/// `y = x Wᵀ` over a GGUF tensor's own blocks with the `gguf-quants` kernels: `x` is `[rows,
/// in]`, `y` `[rows, out]`. The outputs are split across the host threads in ranges of 16;
/// each value is computed by one fixed sequence of operations whatever `rows`, the row's
/// place among them, the split and the instruction set.
pub fn blocks_matmul(
    m: &gguf_quants::QuantMatrix,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
) -> Result<()> {
    let (n_out, n_in) = (m.rows(), m.cols());
    if x.len() != rows * n_in || y.len() != rows * n_out {
        return Err(invalid(format!(
            "{rows} rows: input of {} values for {n_in} features, output of {} for {n_out}",
            x.len(),
            y.len()
        )));
    }
    if n_out == 0 || rows == 0 {
        return Ok(());
    }
    let isa = gguf_quants::Isa::detected();
    let parts = if rows * n_out * n_in < PARALLEL_MIN_MACS {
        1
    } else {
        threads()
    };
    let chunk = n_out.div_ceil(parts).div_ceil(16) * 16;
    let mut yt = vec![0.0f32; rows * n_out];
    try_for_each_piece(&mut yt, chunk * rows, |k, out| {
        let o0 = k * chunk;
        m.matmul_transposed(isa, x, rows, o0..o0 + out.len() / rows, out)
    })
    .map_err(|e| invalid(e.to_string()))?;
    // `yt` is [outputs, rows]: transpose into y.
    for (o, vals) in yt.chunks_exact(rows).enumerate() {
        for (r, &v) in vals.iter().enumerate() {
            y[r * n_out + o] = v;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn isas() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// A random matrix in MLX affine form (codes, scales, biases) from a seed.
    fn random(bits: u32, group: usize, out: usize, inp: usize, seed: u64) -> PackedMatrix {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let per_word = 32 / bits as usize;
        let words: Vec<u32> = (0..out * inp / per_word).map(|_| next() as u32).collect();
        let groups = out * inp / group;
        let f = |v: u64| (v % 2001) as f32 / 1000.0 - 1.0;
        let scales: Vec<f32> = (0..groups).map(|_| f(next()) * 0.1).collect();
        let biases: Vec<f32> = (0..groups).map(|_| f(next()) * 0.5).collect();
        PackedMatrix::from_affine(bits, group, out, inp, &words, &scales, &biases)
            .expect("valid matrix")
    }

    fn input(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let v = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed)
                    .wrapping_mul(0xbf58_476d_1ce4_e5b9);
                ((v >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Every instruction set matches an f64 reference of `x Wᵀ` with the dequantized
        /// weights, for 1..=11 rows, odd output sizes and both code widths.
        #[test]
        fn matches_f64_reference(
            bits in prop::sample::select(vec![4u32, 8]), group_mul in 1usize..3,
            blocks in 1usize..7, out in 1usize..70, rows in 1usize..12,
            seed in any::<u64>(), parts in 1usize..4,
        ) {
            let group = BLOCK * group_mul;
            let inp = blocks * group;
            let w = random(bits, group, out, inp, seed);
            let x = input(rows * inp, seed.rotate_left(17));
            for isa in isas() {
                let mut y = vec![f32::NAN; rows * out];
                w.matmul_with(isa, parts, &x, rows, &mut y).expect("matmul");
                for r in 0..rows {
                    for o in 0..out {
                        let (mut want, mut mag) = (0.0f64, 0.0f64);
                        for i in 0..inp {
                            let p = f64::from(w.weight(o, i)) * f64::from(x[r * inp + i]);
                            want += p;
                            mag += p.abs();
                        }
                        let got = f64::from(y[r * out + o]);
                        prop_assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-6,
                            "{:?} row {} out {}: {} vs {} (magnitude {})", isa, r, o, got, want, mag
                        );
                    }
                }
            }
        }

        /// A row's bits do not depend on the other rows of the call, its position among them
        /// or the thread split.
        #[test]
        fn rows_are_independent_of_batch_and_threads(
            bits in prop::sample::select(vec![4u32, 8]), blocks in 1usize..6,
            out in 1usize..90, rows in 2usize..11, seed in any::<u64>(),
        ) {
            let inp = blocks * BLOCK;
            let w = random(bits, BLOCK, out, inp, seed);
            let x = input(rows * inp, seed ^ 0x55);
            for isa in isas() {
                let mut batch = vec![0.0; rows * out];
                w.matmul_with(isa, 1, &x, rows, &mut batch).expect("matmul");
                let mut split = vec![0.0; rows * out];
                w.matmul_with(isa, 3, &x, rows, &mut split).expect("matmul");
                prop_assert!(batch.iter().zip(&split).all(|(a, b)| a.to_bits() == b.to_bits()));
                let mut pooled = vec![0.0; rows * out];
                w.matmul(&x, rows, &mut pooled).expect("matmul");
                if isa == Isa::detected() {
                    prop_assert!(batch.iter().zip(&pooled).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                for r in 0..rows {
                    let mut alone = vec![0.0; out];
                    w.matmul_with(isa, 2, &x[r * inp..(r + 1) * inp], 1, &mut alone).expect("matmul");
                    prop_assert!(
                        alone.iter().zip(&batch[r * out..(r + 1) * out]).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?}: row {} of {} differs from the row alone", isa, r, rows
                    );
                }
                // The same row at another position, among other rows.
                let mut rev: Vec<f32> = Vec::with_capacity(x.len());
                for r in (0..rows).rev() {
                    rev.extend_from_slice(&x[r * inp..(r + 1) * inp]);
                }
                let mut y = vec![0.0; rows * out];
                w.matmul_with(isa, 2, &rev, rows, &mut y).expect("matmul");
                for r in 0..rows {
                    let a = &y[(rows - 1 - r) * out..][..out];
                    prop_assert!(a.iter().zip(&batch[r * out..][..out]).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn a_large_product_uses_the_pool_and_keeps_bits() {
        let w = random(4, 32, 1000, 576, 7);
        let x = input(3 * 576, 9);
        let mut pooled = vec![0.0; 3 * 1000];
        w.matmul(&x, 3, &mut pooled).expect("matmul");
        let mut alone = vec![0.0; 3 * 1000];
        w.matmul_with(Isa::detected(), 1, &x, 3, &mut alone)
            .expect("matmul");
        assert!(pooled
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn packing_keeps_gguf_nibble_order_and_concat_stacks_rows() {
        // Codes 0..32 in order for one row, MLX packing (first element in the lowest bits).
        let words: Vec<u32> = (0..4)
            .map(|w| (0..8).fold(0u32, |acc, k| acc | (((w * 8 + k) % 16) << (4 * k))))
            .collect();
        let m = PackedMatrix::from_affine(4, 32, 1, 32, &words, &[2.0], &[-1.0]).expect("pack");
        for i in 0..32 {
            assert_eq!(m.weight(0, i), 2.0 * (i % 16) as f32 - 1.0);
        }
        assert_eq!(
            m.data[..HEADER],
            [2.0f32.to_le_bytes(), (-1.0f32).to_le_bytes()].concat()
        );
        assert_eq!(m.data[HEADER], 0x00);
        assert_eq!(m.data[HEADER + 1], 0x11);
        let both = PackedMatrix::concat(vec![m.clone(), m]).expect("concat");
        assert_eq!(both.out_features(), 2);
        assert_eq!(both.weight(1, 5), 9.0);
    }

    #[test]
    fn inconsistent_inputs_are_errors() {
        assert!(PackedMatrix::from_affine(3, 32, 1, 32, &[0; 3], &[1.0], &[0.0]).is_err());
        assert!(PackedMatrix::from_affine(4, 48, 1, 96, &[0; 12], &[1.0; 2], &[0.0; 2]).is_err());
        assert!(PackedMatrix::from_affine(4, 32, 1, 32, &[0; 3], &[1.0], &[0.0]).is_err());
        let w = random(4, 32, 4, 64, 1);
        let mut y = vec![0.0; 4];
        assert!(w.matmul(&[0.0; 63], 1, &mut y).is_err());
        assert!(w.matmul(&[0.0; 64], 1, &mut y[..3]).is_err());
        let eight = random(8, 32, 4, 64, 1);
        assert!(PackedMatrix::concat(vec![w, eight]).is_err());
        assert!(PackedMatrix::concat(vec![]).is_err());
    }
}
