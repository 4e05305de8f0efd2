//! Per-sequence KV buffers: one K and one V array per layer, `[1, kv_heads, capacity,
//! head_dim]`, grown a block at a time and written with slice updates; whole blocks are
//! exported to bytes and imported back bit-exactly.

use crate::error::{Error, MlxContext, Result};
use agent_session::{KvEncoding, KvPayload, KvTensor, TensorDtype};
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};
use std::sync::Arc;

/// Quantization group size of exported quantized KV blocks.
pub const KV_QUANT_GROUP: i32 = 64;

/// Blocks of spare capacity an import into an empty sequence allocates after the imported
/// ones. A restore is always followed by a prefill of at least one token (the service never
/// reuses a whole prompt), which would otherwise regrow, that is copy, every buffer right
/// away; the capacity it reaches is the same as a cold run's, so the numerics are too.
pub const IMPORT_SPARE_BLOCKS: usize = 1;

/// Most threads one import uses (one per CPU up to this). On the 2-core development VM a
/// 16-block (189 MB) import of the default model took 110 ms on one thread.
pub const IMPORT_THREADS: usize = 4;

/// Capacity, in tokens, of the buffers an import of `tokens` tokens into an empty sequence
/// creates: whole blocks plus [`IMPORT_SPARE_BLOCKS`].
pub fn import_capacity(block_tokens: usize, tokens: usize) -> usize {
    let bt = block_tokens.max(1);
    tokens.div_ceil(bt) * bt + IMPORT_SPARE_BLOCKS * bt
}

fn import_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(IMPORT_THREADS))
    })
}

/// Shape of a model's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers with a KV cache.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension (K and V).
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// The sliding window of each layer (`windows[i]`; empty or all `None` when no layer
    /// slides). A sliding layer keeps in RAM only the blocks its window can still reach.
    pub windows: Arc<[Option<usize>]>,
    /// The values are the keys (latent attention's one cached vector per token): V is not
    /// stored, exported or imported, and reads of V give K.
    pub values_are_keys: bool,
}

impl KvLayout {
    /// A layout of global layers with distinct K and V (most models).
    pub fn dense(num_layers: usize, kv_heads: usize, head_dim: usize, block_tokens: usize) -> Self {
        Self {
            num_layers,
            kv_heads,
            head_dim,
            block_tokens,
            windows: Arc::from(Vec::new()),
            values_are_keys: false,
        }
    }

    /// The sliding window of `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }

    /// First position a sliding layer of window `w` must still hold when the next token
    /// to attend is at position `len`: that token sees `len + 1 - w..=len`, rounded down to
    /// a block (what a layer holds starts on a block boundary).
    pub fn window_base(&self, w: usize, len: usize) -> usize {
        let bt = self.block_tokens.max(1);
        (len + 1).saturating_sub(w) / bt * bt
    }
}

/// One layer's buffers: position `p` of the sequence is row `p - base`.
#[derive(Debug)]
struct LayerKv {
    k: Array,
    /// `None` when the values are the keys.
    v: Option<Array>,
    /// First position held (0 on global layers; a block boundary on sliding ones).
    base: usize,
    /// Rows allocated (a multiple of the block size).
    rows: usize,
}

impl LayerKv {
    /// The value buffer (the keys when the values are the keys).
    fn values(&self) -> &Array {
        self.v.as_ref().unwrap_or(&self.k)
    }

    fn buffers(&self) -> impl Iterator<Item = &Array> {
        std::iter::once(&self.k).chain(self.v.as_ref())
    }
}

/// The KV state of one sequence.
#[derive(Debug)]
pub struct SequenceKv {
    layout: KvLayout,
    /// Per layer: K and V, each `[1, kv_heads, rows, head_dim]` f32; empty until the first
    /// write.
    layers: Vec<LayerKv>,
    len: usize,
    /// Whether every buffer is evaluated and row-contiguous with its own memory since the
    /// last change of `layers` ([`SequenceKv::prepare_host`]).
    host_ready: bool,
    /// Length the imports announced by [`SequenceKv::plan_import`] reach (0: none).
    import_plan: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::KvPayload(msg.into())
}

fn i32_of(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| bad(format!("{n} exceeds the tensor size limit")))
}

fn zeros(layout: &KvLayout, rows: usize) -> Result<Array> {
    let shape = [
        1,
        i32_of(layout.kv_heads)?,
        i32_of(rows)?,
        i32_of(layout.head_dim)?,
    ];
    Array::zeros::<f32>(&shape).ctx("allocating KV")
}

impl SequenceKv {
    /// An empty sequence.
    pub fn new(layout: KvLayout) -> Self {
        Self {
            layout,
            layers: Vec::new(),
            len: 0,
            host_ready: false,
            import_plan: 0,
        }
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers can hold without growing (0 before the first reservation).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.base + l.rows)
            .min()
            .unwrap_or(0)
    }

    /// Rows allocated on `layer` (its buffers are `[kv_heads, rows, head_dim]`).
    pub fn layer_rows(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.rows)
    }

    /// First position `layer` holds: row 0 of its buffers (0 unless it slides).
    pub fn layer_base(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.base)
    }

    /// Bytes of KV the buffers hold (allocated rows, every layer).
    pub fn resident_bytes(&self) -> usize {
        let per_row = self.layout.kv_heads * self.layout.head_dim * 4;
        self.layers
            .iter()
            .map(|l| l.rows * per_row * (1 + usize::from(l.v.is_some())))
            .sum()
    }

    /// The layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Makes room for positions up to `total`, growing by whole blocks.
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        let bt = self.layout.block_tokens.max(1);
        if self.layers.is_empty() {
            let rows = total.div_ceil(bt) * bt;
            for _ in 0..self.layout.num_layers {
                let k = zeros(&self.layout, rows)?;
                let v = match self.layout.values_are_keys {
                    true => None,
                    false => Some(zeros(&self.layout, rows)?),
                };
                self.layers.push(LayerKv {
                    k,
                    v,
                    base: 0,
                    rows,
                });
            }
            self.host_ready = false;
            return Ok(());
        }
        for l in &mut self.layers {
            if l.base + l.rows >= total {
                continue;
            }
            let rows = (total - l.base).div_ceil(bt) * bt;
            let more = zeros(&self.layout, rows - l.rows)?;
            l.k = ops::concatenate(&[&l.k, &more], 2).ctx("growing KV")?;
            if let Some(v) = &mut l.v {
                *v = ops::concatenate(&[&*v, &more], 2).ctx("growing KV")?;
            }
            l.rows = rows;
            self.host_ready = false;
        }
        Ok(())
    }

    /// Writes `k_new`/`v_new` (`[1, kv_heads, n, head_dim]`) of `layer` at the current end
    /// (after [`SequenceKv::reserve`]) and returns K and V over the positions the layer holds
    /// up to the new end (from [`SequenceKv::layer_base`]). The length advances only with
    /// [`SequenceKv::advance`], once all layers are written. When the values are the keys,
    /// `v_new` is not stored (it must equal `k_new`).
    pub fn write(&mut self, layer: usize, k_new: &Array, v_new: &Array) -> Result<(Array, Array)> {
        let n = k_new.shape().get(2).copied().unwrap_or(0);
        let len = self.len;
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| bad(format!("layer {layer} out of range")))?;
        let start = len
            .checked_sub(l.base)
            .ok_or_else(|| bad(format!("layer {layer} holds no KV at position {len}")))?;
        let start = i32_of(start)?;
        let end = start + n;
        self.host_ready = false;
        l.k.try_index_mut((.., .., start..end, ..), k_new)
            .ctx("writing K")?;
        if let Some(v) = &mut l.v {
            v.try_index_mut((.., .., start..end, ..), v_new)
                .ctx("writing V")?;
        }
        let keys = l.k.try_index((.., .., ..end, ..)).ctx("slicing K")?;
        let values = match &l.v {
            Some(v) => v.try_index((.., .., ..end, ..)).ctx("slicing V")?,
            None => keys.clone(),
        };
        Ok((keys, values))
    }

    /// The K and V buffers of `layer`, `[1, kv_heads, rows, head_dim]` from
    /// [`SequenceKv::layer_base`] (after the first [`SequenceKv::reserve`]).
    pub fn layer(&self, layer: usize) -> Result<(&Array, &Array)> {
        self.layers
            .get(layer)
            .map(|l| (&l.k, l.values()))
            .ok_or_else(|| bad(format!("layer {layer} out of range")))
    }

    /// Readies every buffer for [`SequenceKv::host_layer_mut`] (after
    /// [`SequenceKv::reserve`]): evaluates them and replaces any that is not a row-contiguous
    /// array of its own (the zeros of a fresh reservation are a broadcast scalar) by a
    /// materialized copy. Cheap when nothing changed since the last call.
    pub fn prepare_host(&mut self) -> Result<()> {
        if self.host_ready {
            return Ok(());
        }
        mlx_rs::transforms::eval(self.arrays()).ctx("evaluating KV")?;
        let (kvh, hd) = (self.layout.kv_heads, self.layout.head_dim);
        for l in &mut self.layers {
            let expected = kvh * l.rows * hd;
            for buf in std::iter::once(&mut l.k).chain(l.v.as_mut()) {
                if !host_access::is_plain(buf, expected) {
                    *buf = buf.contiguous().ctx("materializing KV")?;
                    buf.eval().ctx("materializing KV")?;
                    if !host_access::is_plain(buf, expected) {
                        return Err(bad("a KV buffer cannot be read on the host"));
                    }
                }
            }
        }
        self.host_ready = true;
        Ok(())
    }

    /// K and V of `layer` as mutable host memory, each `[kv_heads, rows, head_dim]`
    /// row-major from [`SequenceKv::layer_base`]: the decode step on the host reads the
    /// cached tokens and writes the new token's K/V in place (position
    /// [`SequenceKv::len`], then [`SequenceKv::advance`]). Needs
    /// [`SequenceKv::prepare_host`] since the buffers last changed, and distinct values.
    pub fn host_layer_mut(&mut self, layer: usize) -> Result<(&mut [f32], &mut [f32])> {
        if !self.host_ready {
            return Err(bad("KV buffers not prepared for host access"));
        }
        let (kvh, hd) = (self.layout.kv_heads, self.layout.head_dim);
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| bad(format!("layer {layer} out of range")))?;
        let expected = kvh * l.rows * hd;
        match &mut l.v {
            Some(v) => host_access::pair_mut(&mut l.k, v, expected),
            None => Err(bad("the values are the keys: no separate value buffer")),
        }
    }

    /// Marks `n` more tokens as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Every buffer (to evaluate them together with the logits).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.layers.iter().flat_map(LayerKv::buffers)
    }

    /// Cuts the sequence back to `tokens` tokens and forgets an announced import; then
    /// drops what no sliding window reaches any more ([`SequenceKv::retain_windows`]).
    /// Global layers keep their capacity. Fails, changing nothing, when a sliding layer no
    /// longer holds the window the shorter sequence needs ([`Error::WindowPassed`]).
    pub fn truncate(&mut self, tokens: usize) -> Result<()> {
        let len = self.len.min(tokens);
        if len == 0 {
            // Nothing held: every layer may start again from position 0.
            for l in &mut self.layers {
                l.base = 0;
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            if let Some(w) = self.layout.window(i) {
                if l.base > self.layout.window_base(w, len) {
                    return Err(Error::WindowPassed(format!(
                        "layer {i} keeps positions from {} on; {len} tokens need its window \
                         from {}",
                        l.base,
                        self.layout.window_base(w, len)
                    )));
                }
            }
        }
        self.len = len;
        self.import_plan = 0;
        self.retain_windows()
    }

    /// Drops the blocks of each sliding layer that the next token (at position
    /// [`SequenceKv::len`]) and every later one can no longer see, and shrinks its buffers
    /// to the blocks left: a sliding layer keeps at most its window plus one block. The
    /// caller exports what it still wants to store first. Each layer's base is a function
    /// of the length alone, so the buffers a prefill chunk attends to are the same whatever
    /// path (cold, restored, hot) led there.
    pub fn retain_windows(&mut self) -> Result<()> {
        let bt = self.layout.block_tokens.max(1);
        let (kvh, hd) = (self.layout.kv_heads, self.layout.head_dim);
        let len = self.len;
        let targets: Vec<(usize, usize)> = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let target = self.layout.window_base(self.layout.window(i)?, len);
                (target > l.base && l.base <= len).then_some((i, target))
            })
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        self.prepare_host()?;
        for (i, target) in targets {
            let l = &mut self.layers[i];
            let drop_rows = target - l.base;
            let rows = (len - target).div_ceil(bt).max(1) * bt;
            let shape = [1, i32_of(kvh)?, i32_of(rows)?, i32_of(hd)?];
            let keep = |buf: &Array| -> Result<Array> {
                // Copied on the host into memory of its own, so the old buffer is freed.
                let data = buf
                    .try_as_slice::<f32>()
                    .map_err(|e| bad(format!("reading KV: {e}")))?;
                let mut out = vec![0.0f32; kvh * rows * hd];
                for (dst, src) in out
                    .chunks_exact_mut(rows * hd)
                    .zip(data.chunks_exact(l.rows * hd))
                {
                    let n = rows.min(l.rows - drop_rows) * hd;
                    dst[..n].copy_from_slice(&src[drop_rows * hd..][..n]);
                }
                Ok(Array::from_slice(&out, &shape))
            };
            let k = keep(&l.k)?;
            let v = l.v.as_ref().map(keep).transpose()?;
            *l = LayerKv {
                k,
                v,
                base: target,
                rows,
            };
        }
        self.host_ready = false;
        Ok(())
    }

    /// Takes the buffers out, leaving the sequence empty with none; `None` when it has
    /// none. For the engine's [`KvPool`].
    pub fn take_buffers(&mut self) -> Option<KvBuffers> {
        let layers = std::mem::take(&mut self.layers);
        self.len = 0;
        self.import_plan = 0;
        self.host_ready = false;
        (!layers.is_empty()).then(|| KvBuffers::from_layers(layers))
    }

    /// Gives an empty sequence `buffers` (from the engine's [`KvPool`]) in place of its own.
    /// Their capacity only changes where the next tokens are written, never a value: the
    /// attention reads the first `len` positions alone.
    pub fn adopt_buffers(&mut self, buffers: KvBuffers) -> Result<()> {
        if self.len != 0 {
            return Err(bad("buffers can only be given to an empty sequence"));
        }
        if buffers.layers.len() != self.layout.num_layers
            || buffers
                .layers
                .iter()
                .any(|l| l.v.is_none() != self.layout.values_are_keys)
        {
            return Err(bad("the buffers are of another KV layout"));
        }
        self.layers = buffers.layers;
        for l in &mut self.layers {
            l.base = 0;
        }
        self.import_plan = 0;
        self.host_ready = false;
        Ok(())
    }

    /// Rows and base of each layer for `end` positions imported into an empty sequence:
    /// global layers from 0, sliding ones from the window `end` needs; room for
    /// [`IMPORT_SPARE_BLOCKS`] more blocks after `end` on each.
    fn import_plans(&self, end: usize) -> Vec<LayerPlan> {
        let capacity = import_capacity(self.layout.block_tokens, end);
        (0..self.layout.num_layers)
            .map(|i| {
                let base = self
                    .layout
                    .window(i)
                    .map_or(0, |w| self.layout.window_base(w, end));
                LayerPlan {
                    base,
                    rows: capacity - base,
                }
            })
            .collect()
    }

    /// Announces that the next [`SequenceKv::import_blocks`] calls append `tokens` tokens
    /// in all, and sizes the buffers for them now, as one import of them all would: the
    /// caller reads the blocks meanwhile, and each part is then decoded straight into the
    /// buffers. Into an empty sequence, sliding layers are sized for their last window only
    /// and skip the blocks before it.
    pub fn plan_import(&mut self, tokens: usize) -> Result<()> {
        self.import_plan = self.len + tokens;
        if tokens == 0 {
            return Ok(());
        }
        if self.len == 0 {
            let plans = self.import_plans(self.import_plan);
            let fits = self.layers.len() == plans.len()
                && self
                    .layers
                    .iter()
                    .zip(&plans)
                    .all(|(l, p)| l.rows >= p.rows);
            if fits {
                // Buffers from the pool: kept where they fit, but a sliding layer that needs
                // far fewer rows than a pooled buffer has gets small ones of its own.
                for (i, (l, p)) in self.layers.iter_mut().zip(&plans).enumerate() {
                    l.base = p.base;
                    if self.layout.window(i).is_some() && l.rows > 2 * p.rows {
                        l.k = zeros(&self.layout, p.rows)?;
                        if l.v.is_some() {
                            l.v = Some(zeros(&self.layout, p.rows)?);
                        }
                        l.rows = p.rows;
                    }
                }
                self.host_ready = false;
            } else {
                // Zeros built on several threads as host data (an import of no block).
                self.layers = self.import_tensors(&[], &plans)?;
                self.host_ready = false;
            }
        } else {
            self.reserve(self.import_plan)?;
        }
        self.prepare_host()
    }

    /// Rows `start..end` of every layer holding block `block`, checked.
    fn block_range(&self, layer: &LayerKv, index: usize, block: usize) -> Result<(usize, usize)> {
        let bt = self.layout.block_tokens;
        let start = block * bt;
        if start + bt > self.len {
            return Err(Error::Request(format!(
                "block {block} is not complete (sequence has {} tokens, block size {bt})",
                self.len
            )));
        }
        if start < layer.base {
            return Err(Error::WindowPassed(format!(
                "block {block} has left the sliding window of layer {index} (it keeps \
                 positions from {} on)",
                layer.base
            )));
        }
        Ok((start - layer.base, start - layer.base + bt))
    }

    /// Copies blocks `first..first + count` out as bytes: `l{i}.k` / `l{i}.v` (no `l{i}.v`
    /// when the values are the keys), `[kv_heads, block_tokens, head_dim]` f32 (bit-exact),
    /// or with `kv_bits` MLX affine quantization with group 64: `l{i}.k` (u32),
    /// `l{i}.k.scales`, `l{i}.k.biases` (f16). A sliding layer must still hold the blocks.
    ///
    /// Float blocks are copied straight from each layer's evaluated buffer into the payload's
    /// bytes (one copy, no intermediate MLX array).
    pub fn export_blocks(
        &self,
        first: usize,
        count: usize,
        kv_bits: Option<u8>,
    ) -> Result<Vec<KvPayload>> {
        for (i, l) in self.layers.iter().enumerate() {
            for b in first..first + count {
                self.block_range(l, i, b)?;
            }
        }
        if count > 0 && self.layers.is_empty() {
            return Err(bad("the sequence has no KV buffers"));
        }
        match kv_bits {
            None => self.export_float(first, count),
            Some(bits) => self.export_quantized(first, count, bits),
        }
    }

    fn kinds(l: &LayerKv) -> impl Iterator<Item = (&'static str, &Array)> {
        std::iter::once(("k", &l.k)).chain(l.v.as_ref().map(|v| ("v", v)))
    }

    fn export_float(&self, first: usize, count: usize) -> Result<Vec<KvPayload>> {
        let KvLayout {
            kv_heads,
            head_dim,
            block_tokens: bt,
            ..
        } = self.layout;
        let per_head = bt * head_dim;
        let mut out: Vec<Vec<KvTensor>> = (0..count)
            .map(|_| Vec::with_capacity(2 * self.layers.len()))
            .collect();
        for (i, l) in self.layers.iter().enumerate() {
            for (kind, buf) in Self::kinds(l) {
                let owned;
                let data: &[f32] = match buf.try_as_slice::<f32>() {
                    Ok(d) => d,
                    // A view (never the case after a write): materialize it once.
                    Err(_) => {
                        owned = buf.contiguous().ctx("copying a KV buffer")?;
                        owned
                            .try_as_slice::<f32>()
                            .map_err(|e| bad(format!("reading KV: {e}")))?
                    }
                };
                // `[1, kv_heads, rows, head_dim]`: head h's rows of block b are `per_head`
                // values at `(h * rows + b * bt - base) * head_dim`.
                if data.len() != kv_heads * l.rows * head_dim {
                    return Err(bad(format!(
                        "KV buffer of layer {i} holds {} values, expected {}",
                        data.len(),
                        kv_heads * l.rows * head_dim
                    )));
                }
                for (tensors, b) in out.iter_mut().zip(first..) {
                    let (row, _) = self.block_range(l, i, b)?;
                    let mut bytes = vec![0u8; kv_heads * per_head * 4];
                    for (h, dst) in bytes.chunks_exact_mut(per_head * 4).enumerate() {
                        let at = (h * l.rows + row) * head_dim;
                        encode_f32(dst, &data[at..at + per_head]);
                    }
                    tensors.push(KvTensor {
                        name: format!("l{i}.{kind}"),
                        dtype: TensorDtype::F32,
                        shape: vec![kv_heads, bt, head_dim],
                        data: bytes.into(),
                    });
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|tensors| KvPayload {
                encoding: KvEncoding::Float {
                    dtype: TensorDtype::F32,
                },
                tensors,
            })
            .collect())
    }

    fn export_quantized(&self, first: usize, count: usize, bits: u8) -> Result<Vec<KvPayload>> {
        let mut out = Vec::with_capacity(count);
        for b in first..first + count {
            // Quantized slices of every layer, evaluated together.
            let mut named: Vec<(String, Array)> = Vec::new();
            for (i, l) in self.layers.iter().enumerate() {
                let (s, e) = self.block_range(l, i, b)?;
                let (s, e) = (i32_of(s)?, i32_of(e)?);
                for (kind, buf) in Self::kinds(l) {
                    let slice = buf.try_index((0, .., s..e, ..)).ctx("slicing a KV block")?;
                    let (w, sc, bi) = ops::quantize(&slice, KV_QUANT_GROUP, i32::from(bits))
                        .ctx("quantizing a KV block")?;
                    named.push((format!("l{i}.{kind}"), w));
                    named.push((
                        format!("l{i}.{kind}.scales"),
                        sc.as_dtype(Dtype::Float16).ctx("casting scales")?,
                    ));
                    named.push((
                        format!("l{i}.{kind}.biases"),
                        bi.as_dtype(Dtype::Float16).ctx("casting biases")?,
                    ));
                }
            }
            mlx_rs::transforms::eval(named.iter().map(|(_, a)| a)).ctx("exporting KV")?;
            let mut tensors = Vec::with_capacity(named.len());
            for (name, a) in named {
                tensors.push(to_kv_tensor(name, &a)?);
            }
            out.push(KvPayload {
                encoding: KvEncoding::Quantized {
                    bits,
                    group_size: KV_QUANT_GROUP as u32,
                },
                tensors,
            });
        }
        Ok(out)
    }

    /// The tensor names of layer `i` in a payload.
    fn tensor_names(&self, i: usize) -> impl Iterator<Item = String> {
        let v = (!self.layout.values_are_keys).then(|| format!("l{i}.v"));
        std::iter::once(format!("l{i}.k")).chain(v)
    }

    /// Appends whole blocks (the sequence length must be a multiple of the block size).
    ///
    /// Every payload is checked before the sequence changes, so a bad payload leaves it as
    /// it was. Into an empty sequence, float blocks are decoded on the host into one
    /// `[1, kv_heads, rows, head_dim]` array per layer and K/V (one copy into a reused
    /// scratch buffer, one into MLX) that become the buffers themselves, with room for the
    /// rest of an announced import ([`SequenceKv::plan_import`]) and
    /// [`IMPORT_SPARE_BLOCKS`] more blocks. When the buffers already have room, float
    /// blocks are decoded straight into them; otherwise the buffers grow and the blocks are
    /// written after the current end. Sliding layers keep only what their window reaches.
    pub fn import_blocks(&mut self, payloads: &[&KvPayload]) -> Result<()> {
        let bt = self.layout.block_tokens;
        if !self.len.is_multiple_of(bt) {
            return Err(Error::Request(format!(
                "import needs a block-aligned sequence, it has {} tokens",
                self.len
            )));
        }
        if payloads.is_empty() {
            return Ok(());
        }
        let n = payloads.len() * bt;
        // The length the announced imports reach, this one included.
        let end = self.import_plan.max(self.len + n);
        let room = !self.layers.is_empty() && self.capacity() >= self.len + n;
        if room && payloads.iter().all(|p| float_dtype(p).is_some()) {
            // Room already there (sized by an announced import, or left by a truncation):
            // decode straight into the buffers.
            self.import_in_place(payloads)?;
        } else if self.len == 0 {
            // The imported arrays become the buffers: give them the room of the whole
            // announced import and the next prefill needs anyway.
            let plans = self.import_plans(end);
            let imported = self.import_tensors(payloads, &plans)?;
            self.layers = imported;
            self.host_ready = false;
        } else {
            let plans: Vec<LayerPlan> = (0..self.layout.num_layers)
                .map(|_| LayerPlan { base: 0, rows: n })
                .collect();
            let imported = self.import_tensors(payloads, &plans)?;
            self.reserve(end)?;
            let len = self.len;
            for (l, new) in self.layers.iter_mut().zip(imported) {
                let start = len
                    .checked_sub(l.base)
                    .ok_or_else(|| bad("a layer holds no KV at the import's start"))?;
                let (start, stop) = (i32_of(start)?, i32_of(start + n)?);
                l.k.try_index_mut((.., .., start..stop, ..), &new.k)
                    .ctx("writing imported K")?;
                if let (Some(v), Some(vn)) = (&mut l.v, &new.v) {
                    v.try_index_mut((.., .., start..stop, ..), vn)
                        .ctx("writing imported V")?;
                }
            }
            self.host_ready = false;
        }
        mlx_rs::transforms::eval(self.arrays()).ctx("importing KV")?;
        self.len += n;
        if self.len >= self.import_plan {
            self.import_plan = 0;
        }
        self.retain_windows()
    }

    /// Decodes float payloads on the host straight into the buffers after the current
    /// end (which must have room for them), layers split over up to [`IMPORT_THREADS`]
    /// threads; a sliding layer skips the blocks before its base. Every tensor is checked
    /// first, so a bad payload writes nothing.
    fn import_in_place(&mut self, payloads: &[&KvPayload]) -> Result<()> {
        let KvLayout {
            num_layers,
            kv_heads: kvh,
            head_dim: hd,
            block_tokens: bt,
            ..
        } = self.layout;
        let mut sources = Vec::with_capacity(payloads.len());
        for p in payloads {
            let dtype = float_dtype(p).ok_or_else(|| bad("not a float block"))?;
            let mut layers = Vec::with_capacity(num_layers);
            for i in 0..num_layers {
                let mut pair = self
                    .tensor_names(i)
                    .map(|name| find(p, &name, dtype, &[kvh, bt, hd]));
                let k = pair.next().ok_or_else(|| bad("no key tensor"))??;
                let v = pair.next().transpose()?;
                layers.push([Some(k), v]);
            }
            sources.push((dtype, layers));
        }
        self.prepare_host()?;
        let start = self.len;
        let mut buffers = Vec::with_capacity(num_layers);
        for l in &mut self.layers {
            let expected = kvh * l.rows * hd;
            let (base, rows) = (l.base, l.rows);
            let pair = match &mut l.v {
                Some(v) => {
                    let (k, v) = host_access::pair_mut(&mut l.k, v, expected)?;
                    [Some(k), Some(v)]
                }
                None => [Some(host_access::one_mut(&mut l.k, expected)?), None],
            };
            buffers.push((base, rows, pair));
        }
        let per_head = bt * hd;
        type Part<'a, 'b> = &'a mut [(usize, usize, [Option<&'b mut [f32]>; 2])];
        let fill = |first: usize, part: Part<'_, '_>| -> Result<()> {
            for (i, (base, rows, pair)) in part.iter_mut().enumerate() {
                for (which, buf) in pair.iter_mut().enumerate() {
                    let Some(buf) = buf else { continue };
                    for (b, (dtype, layers)) in sources.iter().enumerate() {
                        let Some(tensor) = layers[first + i][which] else {
                            continue;
                        };
                        let Some(row) = (start + b * bt).checked_sub(*base) else {
                            // Before this sliding layer's window: not kept.
                            continue;
                        };
                        let heads = tensor.data.chunks_exact(per_head * dtype.size());
                        for (h, src) in heads.enumerate() {
                            let at = (h * *rows + row) * hd;
                            decode_f32(&mut buf[at..at + per_head], src, *dtype)
                                .map_err(|e| bad(format!("tensor `{}`: {e}", tensor.name)))?;
                        }
                    }
                }
            }
            Ok(())
        };
        let threads = import_threads().min(num_layers).max(1);
        let per = num_layers.div_ceil(threads);
        std::thread::scope(|scope| -> Result<()> {
            let mut parts = buffers.chunks_mut(per).enumerate();
            let mine = parts.next();
            let helpers: Vec<_> = parts
                .map(|(t, part)| scope.spawn(move || fill(t * per, part)))
                .collect();
            let mut result = mine.map_or(Ok(()), |(_, part)| fill(0, part));
            for h in helpers {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(bad("a KV import thread panicked")));
                result = result.and(r);
            }
            result
        })
    }

    /// Every layer's K and V of the payloads, as [`SequenceKv::import_tensor`] builds them,
    /// each layer after its plan. The tensors are split over up to [`IMPORT_THREADS`]
    /// threads: building them is host work (decoding, and the copy into fresh MLX memory,
    /// whose page faults dominate), and creating an MLX array from host data touches no
    /// stream, so it may run off the engine thread. The split never changes a value.
    fn import_tensors(&self, payloads: &[&KvPayload], plans: &[LayerPlan]) -> Result<Vec<LayerKv>> {
        let names: Vec<(usize, String)> = (0..self.layout.num_layers)
            .flat_map(|i| self.tensor_names(i).map(move |n| (i, n)))
            .collect();
        // Only float blocks are decoded on the host alone; quantized ones go through MLX
        // operations, which stay on the engine thread.
        let host_only = payloads.iter().all(|p| float_dtype(p).is_some());
        let threads = if host_only {
            import_threads().min(names.len()).max(1)
        } else {
            1
        };
        let layout = &self.layout;
        let build = |first: usize| -> Result<Vec<(usize, Array)>> {
            let mut scratch = Vec::new();
            let mut out = Vec::new();
            for (at, (layer, name)) in names.iter().enumerate().skip(first).step_by(threads) {
                out.push((
                    at,
                    Self::import_tensor(layout, payloads, name, plans[*layer], &mut scratch)?,
                ));
            }
            Ok(out)
        };
        let mut parts: Vec<Result<Vec<(usize, Array)>>> = Vec::with_capacity(threads);
        std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads)
                .map(|t| {
                    std::thread::Builder::new()
                        .name("kv-import".into())
                        .spawn_scoped(scope, move || build(t))
                        .map_err(|e| (t, e))
                })
                .collect();
            parts.push(build(0));
            for h in helpers {
                parts.push(match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(bad("a KV import thread panicked"))),
                    // No thread: do its share here.
                    Err((t, _)) => build(t),
                });
            }
        });
        let mut tensors: Vec<Option<Array>> = (0..names.len()).map(|_| None).collect();
        for part in parts {
            for (at, a) in part? {
                tensors[at] = Some(a);
            }
        }
        let mut it = tensors.into_iter();
        let mut layers = Vec::with_capacity(self.layout.num_layers);
        for plan in plans {
            let k = it.next().flatten();
            let v = match self.layout.values_are_keys {
                true => None,
                false => Some(it.next().flatten()),
            };
            let (Some(k), v) = (k, v) else {
                return Err(bad("a KV import thread lost a tensor"));
            };
            let v = match v {
                Some(Some(v)) => Some(v),
                Some(None) => return Err(bad("a KV import thread lost a tensor")),
                None => None,
            };
            layers.push(LayerKv {
                k,
                v,
                base: plan.base,
                rows: plan.rows,
            });
        }
        Ok(layers)
    }

    /// Tensor `name` of every payload, in order, as one `[1, kv_heads, plan.rows, head_dim]`
    /// f32 array from position `plan.base`: the blocks' tokens first (those before the base
    /// skipped), zeros after them. `scratch` is reused between calls.
    fn import_tensor(
        layout: &KvLayout,
        payloads: &[&KvPayload],
        name: &str,
        plan: LayerPlan,
        scratch: &mut Vec<f32>,
    ) -> Result<Array> {
        let KvLayout {
            kv_heads: kvh,
            head_dim: hd,
            block_tokens: bt,
            ..
        } = *layout;
        let capacity = plan.rows;
        let skip = plan.base / bt.max(1);
        let n = payloads.len() * bt;
        let shape = [1, i32_of(kvh)?, i32_of(capacity)?, i32_of(hd)?];
        // MLX sizes arrays with i32 element counts.
        let elements = kvh
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(hd))
            .ok_or_else(|| bad(format!("{n} imported tokens exceed the tensor size limit")))?;
        i32_of(elements)?;
        if payloads.iter().all(|p| float_dtype(p).is_some()) {
            // Head h of block b goes to rows `(b - skip) * bt..` of head h; the rows past
            // the blocks stay zero (never written between calls).
            let per_head = bt * hd;
            if scratch.len() != elements {
                *scratch = vec![0.0; elements];
            }
            for (b, p) in payloads.iter().enumerate() {
                let dtype = float_dtype(p).unwrap_or(TensorDtype::F32);
                let t = find(p, name, dtype, &[kvh, bt, hd])?;
                let Some(at) = b.checked_sub(skip) else {
                    continue;
                };
                let src_head = per_head * dtype.size();
                for (dst, src) in scratch
                    .chunks_exact_mut(capacity * hd)
                    .zip(t.data.chunks_exact(src_head))
                {
                    decode_f32(&mut dst[at * per_head..(at + 1) * per_head], src, dtype)
                        .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                }
            }
            return Ok(Array::from_slice(scratch, &shape));
        }
        let mut blocks = Vec::with_capacity(payloads.len());
        for p in payloads.iter().skip(skip) {
            blocks.push(match p.encoding {
                KvEncoding::Float {
                    dtype: TensorDtype::U32,
                } => return Err(bad("a float block holds u32 values")),
                KvEncoding::Float { dtype } => {
                    let t = find(p, name, dtype, &[kvh, bt, hd])?;
                    from_kv_tensor(t)?
                        .as_dtype(Dtype::Float32)
                        .ctx("casting imported KV")?
                }
                KvEncoding::Quantized { bits, group_size } => {
                    dequantize_tensor(p, name, bits, group_size, [kvh, bt, hd])?
                }
            });
        }
        let held = blocks.len() * bt;
        if capacity > held {
            blocks.push(
                Array::zeros::<f32>(&[i32_of(kvh)?, i32_of(capacity - held)?, i32_of(hd)?])
                    .ctx("allocating KV")?,
            );
        }
        let joined = ops::concatenate(&blocks, 1).ctx("joining imported KV")?;
        joined.reshape(&shape).ctx("reshaping imported KV")
    }
}

/// Where one layer's imported buffers start and how many rows they have.
#[derive(Debug, Clone, Copy)]
struct LayerPlan {
    base: usize,
    rows: usize,
}

/// One sequence's K and V buffers for every layer, with their capacity in tokens.
#[derive(Debug)]
pub struct KvBuffers {
    layers: Vec<LayerKv>,
    capacity: usize,
}

impl KvBuffers {
    fn from_layers(layers: Vec<LayerKv>) -> Self {
        let capacity = layers.iter().map(|l| l.rows).min().unwrap_or(0);
        Self { layers, capacity }
    }

    /// Fresh, evaluated zero buffers of at least `capacity` tokens (an import's capacity,
    /// [`import_capacity`]), built on several threads.
    pub fn allocate(layout: KvLayout, capacity: usize) -> Result<Self> {
        let spare = IMPORT_SPARE_BLOCKS * layout.block_tokens;
        let mut kv = SequenceKv::new(layout);
        let plans: Vec<LayerPlan> = (0..kv.layout.num_layers)
            .map(|_| LayerPlan {
                base: 0,
                rows: import_capacity(kv.layout.block_tokens, capacity.saturating_sub(spare)),
            })
            .collect();
        kv.layers = kv.import_tensors(&[], &plans)?;
        kv.prepare_host()?;
        kv.take_buffers()
            .ok_or_else(|| bad("no KV buffers were allocated"))
    }

    /// Capacity in tokens (the smallest layer's).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Spare KV buffers kept for reuse, up to a capacity in tokens: a released sequence's
/// buffers come here, and a restore takes the smallest that fits instead of fresh memory.
///
/// Why: fresh memory costs a page fault per 4 KiB; for a 4,096-token restore of the default
/// model that is 200 MB of faults, about as much CPU as reading the blocks. Filled at
/// start-up, the pool also spares the first restore after a restart.
#[derive(Debug, Default)]
pub struct KvPool {
    sets: Vec<KvBuffers>,
    max_tokens: usize,
}

impl KvPool {
    /// A pool holding at most `max_tokens` tokens of capacity in all (0: keeps nothing).
    pub fn new(max_tokens: usize) -> Self {
        Self {
            sets: Vec::new(),
            max_tokens,
        }
    }

    /// Tokens of capacity held.
    pub fn held_tokens(&self) -> usize {
        self.sets.iter().map(|b| b.capacity).sum()
    }

    /// Keeps `buffers` for reuse, dropping the oldest sets to stay within the limit (and
    /// `buffers` itself when it alone exceeds it).
    pub fn put(&mut self, buffers: KvBuffers) {
        if buffers.capacity > self.max_tokens {
            return;
        }
        while self.held_tokens() + buffers.capacity > self.max_tokens && !self.sets.is_empty() {
            self.sets.remove(0);
        }
        self.sets.push(buffers);
    }

    /// The smallest set of at least `min_capacity` tokens and at most twice that (a larger
    /// one would hold memory the sequence does not need), if any.
    pub fn take(&mut self, min_capacity: usize) -> Option<KvBuffers> {
        let best = self
            .sets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity >= min_capacity && b.capacity <= 2 * min_capacity)
            .min_by_key(|(_, b)| b.capacity)
            .map(|(i, _)| i)?;
        Some(self.sets.swap_remove(best))
    }
}

/// The dtype of a float payload's tensors; `None` for quantized payloads (and the invalid
/// float u32).
fn float_dtype(p: &KvPayload) -> Option<TensorDtype> {
    match p.encoding {
        KvEncoding::Float { dtype } if dtype != TensorDtype::U32 => Some(dtype),
        KvEncoding::Float { .. } | KvEncoding::Quantized { .. } => None,
    }
}

/// Tensor `name` of a quantized payload (with its `.scales` and `.biases`), dequantized to
/// a `[kv_heads, block_tokens, head_dim]` f32 array.
fn dequantize_tensor(
    p: &KvPayload,
    name: &str,
    bits: u8,
    group_size: u32,
    [kvh, bt, hd]: [usize; 3],
) -> Result<Array> {
    if !matches!(bits, 4 | 8) || group_size == 0 || !hd.is_multiple_of(group_size as usize) {
        return Err(bad(format!(
            "unsupported KV quantization: {bits} bits, group {group_size}"
        )));
    }
    let packed = hd * usize::from(bits) / 32;
    let groups = hd / group_size as usize;
    let w = find(p, name, TensorDtype::U32, &[kvh, bt, packed])?;
    let sn = format!("{name}.scales");
    let bn = format!("{name}.biases");
    let s = p
        .tensors
        .iter()
        .find(|t| t.name == sn)
        .ok_or_else(|| bad(format!("missing tensor `{sn}`")))?;
    let b = p
        .tensors
        .iter()
        .find(|t| t.name == bn)
        .ok_or_else(|| bad(format!("missing tensor `{bn}`")))?;
    check(s, &[kvh, bt, groups])?;
    check(b, &[kvh, bt, groups])?;
    let sa = from_kv_tensor(s)?
        .as_dtype(Dtype::Float32)
        .ctx("casting scales")?;
    let ba = from_kv_tensor(b)?
        .as_dtype(Dtype::Float32)
        .ctx("casting biases")?;
    ops::dequantize(
        from_kv_tensor(w)?,
        &sa,
        &ba,
        group_size as i32,
        i32::from(bits),
    )
    .ctx("dequantizing imported KV")
}

fn check(t: &KvTensor, shape: &[usize]) -> Result<()> {
    if t.shape != shape || !t.is_consistent() {
        return Err(bad(format!(
            "tensor `{}` has shape {:?} ({} bytes), expected {shape:?}",
            t.name,
            t.shape,
            t.data.len()
        )));
    }
    Ok(())
}

fn find<'a>(
    p: &'a KvPayload,
    name: &str,
    dtype: TensorDtype,
    shape: &[usize],
) -> Result<&'a KvTensor> {
    let t = p
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| bad(format!("missing tensor `{name}`")))?;
    if t.dtype != dtype {
        return Err(bad(format!(
            "tensor `{name}` has dtype {:?}, expected {dtype:?}",
            t.dtype
        )));
    }
    check(t, shape)?;
    Ok(t)
}

/// An evaluated, contiguous array as a byte tensor (one copy, from MLX's buffer).
fn to_kv_tensor(name: String, a: &Array) -> Result<KvTensor> {
    let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
    let (dtype, data) = match a.dtype() {
        Dtype::Float32 => (
            TensorDtype::F32,
            le_bytes(a.try_as_slice::<f32>().ctx("reading KV")?, f32::to_le_bytes),
        ),
        Dtype::Uint32 => (
            TensorDtype::U32,
            le_bytes(a.try_as_slice::<u32>().ctx("reading KV")?, u32::to_le_bytes),
        ),
        Dtype::Float16 => (
            TensorDtype::F16,
            le_bytes(
                a.try_as_slice::<half::f16>().ctx("reading KV")?,
                half::f16::to_le_bytes,
            ),
        ),
        Dtype::Bfloat16 => (
            TensorDtype::Bf16,
            le_bytes(
                a.try_as_slice::<half::bf16>().ctx("reading KV")?,
                half::bf16::to_le_bytes,
            ),
        ),
        other => return Err(bad(format!("cannot export dtype {other:?}"))),
    };
    Ok(KvTensor {
        name,
        dtype,
        shape,
        data: data.into(),
    })
}

/// `v` as little-endian bytes.
fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * N];
    for (dst, &x) in out.chunks_exact_mut(N).zip(v) {
        dst.copy_from_slice(&f(x));
    }
    out
}

/// Writes `src` into `dst` as little-endian f32 bytes (`dst.len() == 4 * src.len()`).
fn encode_f32(dst: &mut [u8], src: &[f32]) {
    for (d, x) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

/// Decodes little-endian `dtype` values from `src` into `dst` as f32 (exact: f16 and bf16
/// widen without rounding). `src` holds exactly `dst.len()` values.
fn decode_f32(dst: &mut [f32], src: &[u8], dtype: TensorDtype) -> Result<(), String> {
    if src.len() != dst.len() * dtype.size() {
        return Err(format!(
            "{} bytes for {} values of {dtype:?}",
            src.len(),
            dst.len()
        ));
    }
    match dtype {
        TensorDtype::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        TensorDtype::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorDtype::Bf16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorDtype::U32 => return Err("a float block holds u32 values".into()),
    }
    Ok(())
}

fn from_kv_tensor(t: &KvTensor) -> Result<Array> {
    if !t.is_consistent() {
        return Err(bad(format!(
            "tensor `{}` length does not match its shape",
            t.name
        )));
    }
    let shape: Vec<i32> = t.shape.iter().map(|&d| i32_of(d)).collect::<Result<_>>()?;
    Ok(match t.dtype {
        TensorDtype::F32 => {
            let v: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Array::from_slice(&v, &shape)
        }
        TensorDtype::U32 => {
            let v: Vec<u32> = t
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Array::from_slice(&v, &shape)
        }
        TensorDtype::F16 => {
            let v: Vec<half::f16> = t
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Array::from_slice(&v, &shape)
        }
        TensorDtype::Bf16 => {
            let v: Vec<half::bf16> = t
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            Array::from_slice(&v, &shape)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static LAYOUT: std::sync::LazyLock<KvLayout> =
        std::sync::LazyLock::new(|| KvLayout::dense(2, 2, 64, 64));

    /// A float block whose values encode (seed, layer, kind, index); with `extremes`, a few
    /// negative zeros, subnormals and huge values are mixed in (bit patterns must survive).
    fn float_block_with(seed: u32, extremes: bool) -> KvPayload {
        block_of_layout(&LAYOUT, seed, extremes)
    }

    /// A float block of `layout` (only `l{i}.k` when its values are its keys), values as
    /// [`float_block_with`] makes them.
    fn block_of_layout(layout: &KvLayout, seed: u32, extremes: bool) -> KvPayload {
        let n = layout.kv_heads * layout.block_tokens * layout.head_dim;
        let kinds: &[&str] = if layout.values_are_keys {
            &["k"]
        } else {
            &["k", "v"]
        };
        let mut tensors = Vec::new();
        for i in 0..layout.num_layers {
            for (k, kind) in kinds.iter().enumerate() {
                let values: Vec<f32> = (0..n)
                    .map(|j| match (extremes, j % 97) {
                        (true, 0) => -0.0,
                        (true, 1) => f32::from_bits(1 + seed),
                        (true, 2) => 3.0e38,
                        _ => {
                            (seed as f32) * 10.0 + (i * 2 + k) as f32 * 0.5
                                - ((j * 7919) % 1000) as f32 * 1e-2
                        }
                    })
                    .collect();
                let mut data = vec![0u8; n * 4];
                encode_f32(&mut data, &values);
                tensors.push(KvTensor {
                    name: format!("l{i}.{kind}"),
                    dtype: TensorDtype::F32,
                    shape: vec![layout.kv_heads, layout.block_tokens, layout.head_dim],
                    data: data.into(),
                });
            }
        }
        KvPayload {
            encoding: KvEncoding::Float {
                dtype: TensorDtype::F32,
            },
            tensors,
        }
    }

    fn float_block(seed: u32) -> KvPayload {
        float_block_with(seed, true)
    }

    #[test]
    fn float_blocks_round_trip_bit_exactly_fresh_and_appended() {
        let blocks: Vec<KvPayload> = (0..4).map(float_block).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut kv = SequenceKv::new(LAYOUT.clone());
        kv.import_blocks(&refs[..2])
            .expect("import into an empty sequence");
        assert_eq!(
            (kv.len(), kv.capacity()),
            (128, 128 + 64 * IMPORT_SPARE_BLOCKS)
        );
        kv.import_blocks(&refs[2..3]).expect("append one");
        kv.import_blocks(&refs[3..]).expect("append another");
        assert_eq!(kv.len(), 256);
        let out = kv.export_blocks(0, 4, None).expect("export");
        assert!(
            out == blocks,
            "exported bytes differ from the imported ones"
        );
        let tail = kv.export_blocks(2, 2, None).expect("export a range");
        assert!(tail == blocks[2..]);
        // Truncated to 0 and imported again: fresh buffers, same bytes.
        kv.truncate(0).expect("truncate");
        kv.import_blocks(&refs[1..2])
            .expect("import after truncate");
        assert!(kv.export_blocks(0, 1, None).expect("export") == blocks[1..2]);
    }

    #[test]
    fn a_planned_import_in_parts_equals_one_import() {
        let bt = LAYOUT.block_tokens;
        let blocks: Vec<KvPayload> = (0..5).map(float_block).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut whole = SequenceKv::new(LAYOUT.clone());
        whole.import_blocks(&refs).expect("one import");

        // Into an empty sequence: the plan sizes the buffers for all.
        let mut parts = SequenceKv::new(LAYOUT.clone());
        parts.plan_import(5 * bt).expect("plan");
        assert_eq!(parts.capacity(), whole.capacity(), "sized by the plan");
        for part in refs.chunks(2) {
            parts.import_blocks(part).expect("import a part");
            assert_eq!(parts.capacity(), whole.capacity(), "sized once");
        }
        assert_eq!(parts.len(), whole.len());
        assert!(parts.export_blocks(0, 5, None).expect("export") == blocks);

        // After existing blocks: one growth for the whole announced import, then in place.
        let mut grown = SequenceKv::new(LAYOUT.clone());
        grown.import_blocks(&refs[..1]).expect("first block");
        grown.plan_import(4 * bt).expect("plan");
        assert_eq!(grown.capacity(), 5 * bt);
        grown.import_blocks(&refs[1..3]).expect("second part");
        grown.import_blocks(&refs[3..]).expect("third part");
        assert_eq!((grown.len(), grown.capacity()), (5 * bt, 5 * bt));
        assert!(grown.export_blocks(0, 5, None).expect("export") == blocks);

        // Planned but cut short by a truncation: what was imported stays exact, and a
        // later import past the buffers grows them.
        let mut cut = SequenceKv::new(LAYOUT.clone());
        cut.plan_import(3 * bt).expect("plan");
        cut.import_blocks(&refs[..1]).expect("import");
        cut.truncate(bt).expect("truncate");
        cut.import_blocks(&refs[1..]).expect("import past the plan");
        assert_eq!((cut.len(), cut.capacity()), (5 * bt, 5 * bt));
        assert!(cut.export_blocks(0, 5, None).expect("export") == blocks);
    }

    /// A plain (no extreme values) float block of `layout`.
    fn block_of(layout: &KvLayout, seed: u32) -> KvPayload {
        block_of_layout(layout, seed, false)
    }

    /// Two layers, the first sliding over 100 tokens, blocks of 64.
    fn sliding_layout() -> KvLayout {
        KvLayout {
            windows: Arc::from(vec![Some(100), None]),
            ..KvLayout::dense(2, 2, 64, 64)
        }
    }

    #[test]
    fn a_sliding_layer_keeps_its_window_plus_one_block() {
        let layout = sliding_layout();
        let bt = layout.block_tokens;
        let blocks: Vec<KvPayload> = (0..6).map(|i| block_of(&layout, i)).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        // The next token (384) sees 285..=384: the sliding layer keeps blocks 4 and 5.
        assert_eq!(layout.window_base(100, 6 * bt), 4 * bt);
        for (planned, pooled) in [(false, false), (true, false), (true, true)] {
            let mut kv = SequenceKv::new(layout.clone());
            if pooled {
                // Spare buffers of a long sequence from the pool: full rows on every layer.
                let spare = KvBuffers::allocate(layout.clone(), 12 * bt).expect("allocate");
                kv.adopt_buffers(spare).expect("adopt");
            }
            if planned {
                kv.plan_import(6 * bt).expect("plan");
            }
            if pooled {
                assert_eq!(
                    kv.layer_rows(1),
                    12 * bt,
                    "the global layer keeps the pooled rows"
                );
            }
            for part in refs.chunks(2) {
                kv.import_blocks(part).expect("import");
            }
            assert_eq!((kv.layer_base(0), kv.layer_base(1)), (4 * bt, 0));
            assert!(kv.layer_rows(0) <= 3 * bt, "window + one block (+ a spare)");
            assert!(kv.layer_rows(1) >= 6 * bt);
            // What is held exports exactly; what left the window cannot be exported.
            assert!(kv.export_blocks(4, 2, None).expect("export") == blocks[4..]);
            assert!(matches!(
                kv.export_blocks(3, 1, None),
                Err(Error::WindowPassed(_))
            ));
            // Cutting back past what the window holds fails and changes nothing ...
            assert!(matches!(kv.truncate(5 * bt), Err(Error::WindowPassed(_))));
            assert_eq!(kv.len(), 6 * bt);
            // ... to the end of the held blocks works; to nothing always does.
            kv.truncate(6 * bt).expect("no-op truncation");
            assert!(kv.export_blocks(4, 2, None).expect("export") == blocks[4..]);
            kv.truncate(0).expect("truncate to nothing");
            assert_eq!((kv.len(), kv.layer_base(0)), (0, 0));
        }
        // Dense: 6 blocks × 2 layers; sliding: 3 + 7 blocks (the spare block included).
        let dense = {
            let mut kv = SequenceKv::new(LAYOUT.clone());
            let d: Vec<KvPayload> = (0..6).map(|i| block_of(&LAYOUT, i)).collect();
            kv.import_blocks(&d.iter().collect::<Vec<_>>())
                .expect("import");
            kv.resident_bytes()
        };
        let mut kv = SequenceKv::new(layout.clone());
        kv.import_blocks(&refs).expect("import");
        assert!(kv.resident_bytes() < dense * 3 / 4);
    }

    #[test]
    fn an_import_cut_short_before_the_window_is_refused_at_the_truncation() {
        let layout = sliding_layout();
        let bt = layout.block_tokens;
        let blocks: Vec<KvPayload> = (0..6).map(|i| block_of(&layout, i)).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut kv = SequenceKv::new(layout);
        // Planned for 6 blocks: the sliding layer is sized for blocks 4.. only and skips the
        // first ones; only 3 arrive, so 3 blocks' window (blocks 1-2) was never kept.
        kv.plan_import(6 * bt).expect("plan");
        assert_eq!(kv.layer_base(0), 4 * bt);
        kv.import_blocks(&refs[..3]).expect("import");
        assert!(matches!(kv.truncate(3 * bt), Err(Error::WindowPassed(_))));
        kv.truncate(0).expect("start over");
        kv.import_blocks(&refs[..3]).expect("import again");
        assert_eq!(kv.layer_base(0), bt);
        assert!(kv.export_blocks(1, 2, None).expect("export") == blocks[1..3]);
    }

    #[test]
    fn a_prefix_reached_either_way_holds_the_same_rows() {
        // Cold: written a chunk at a time, dropping at each chunk; warm: imported. The
        // buffers the next chunk attends to start at the same position with the same rows.
        let layout = sliding_layout();
        let bt = layout.block_tokens;
        let blocks: Vec<KvPayload> = (0..5).map(|i| block_of(&layout, i)).collect();
        let mut cold = SequenceKv::new(layout.clone());
        for (b, block) in blocks.iter().enumerate() {
            cold.retain_windows().expect("retain");
            cold.reserve((b + 1) * bt).expect("reserve");
            for i in 0..2 {
                let k = find(block, &format!("l{i}.k"), TensorDtype::F32, &[2, bt, 64])
                    .and_then(from_kv_tensor)
                    .and_then(|a| a.reshape(&[1, 2, bt as i32, 64]).ctx("reshape"))
                    .expect("k");
                let v = find(block, &format!("l{i}.v"), TensorDtype::F32, &[2, bt, 64])
                    .and_then(from_kv_tensor)
                    .and_then(|a| a.reshape(&[1, 2, bt as i32, 64]).ctx("reshape"))
                    .expect("v");
                cold.write(i, &k, &v).expect("write");
            }
            cold.advance(bt);
        }
        cold.retain_windows().expect("retain");
        let mut warm = SequenceKv::new(layout);
        warm.import_blocks(&blocks.iter().collect::<Vec<_>>())
            .expect("import");
        for i in 0..2 {
            assert_eq!(cold.layer_base(i), warm.layer_base(i), "layer {i}");
        }
        assert!(
            cold.export_blocks(3, 2, None).expect("cold")
                == warm.export_blocks(3, 2, None).expect("warm")
        );
    }

    #[test]
    fn values_that_are_the_keys_are_stored_once() {
        let layout = KvLayout {
            values_are_keys: true,
            ..KvLayout::dense(2, 1, 64, 64)
        };
        let bt = layout.block_tokens;
        let blocks: Vec<KvPayload> = (0..3).map(|i| block_of(&layout, i)).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut kv = SequenceKv::new(layout.clone());
        kv.plan_import(3 * bt).expect("plan");
        kv.import_blocks(&refs[..1]).expect("import in place");
        kv.import_blocks(&refs[1..]).expect("import in place");
        let out = kv.export_blocks(0, 3, None).expect("export");
        assert!(out == blocks, "keys only, bit-exact");
        assert!(out[0].tensors.iter().all(|t| !t.name.ends_with(".v")));
        let (k, v) = kv.layer(1).expect("layer");
        let data = |a: &Array| a.try_as_slice::<f32>().map(|s| s.as_ptr()).ok();
        assert!(
            data(k).is_some() && data(k) == data(v),
            "V reads K's memory"
        );
        let mut dense = SequenceKv::new(KvLayout::dense(2, 1, 64, 64));
        dense.reserve(3 * bt).expect("reserve");
        assert_eq!(
            kv.resident_bytes() * 2,
            dense.resident_bytes() + 2 * bt * 64 * 4 * 2
        );
        // A dense block (with V) does not fit, nor the reverse.
        let with_v = block_of(&KvLayout::dense(2, 1, 64, 64), 9);
        let mut fresh = SequenceKv::new(layout);
        fresh
            .import_blocks(&[&with_v])
            .expect("extra tensors are ignored");
        let mut dense = SequenceKv::new(KvLayout::dense(2, 1, 64, 64));
        assert!(dense.import_blocks(&[&blocks[0]]).is_err(), "no V tensor");
        // Writes store K once and hand it back as V.
        let mut w = SequenceKv::new(KvLayout {
            values_are_keys: true,
            ..KvLayout::dense(1, 1, 64, 64)
        });
        w.reserve(1).expect("reserve");
        let k = Array::from_slice(&[1.5f32; 64], &[1, 1, 1, 64]);
        let (keys, values) = w.write(0, &k, &k).expect("write");
        assert!(keys.try_as_slice::<f32>().ok() == values.try_as_slice::<f32>().ok());
        assert!(w.host_layer_mut(0).is_err(), "no separate V to hand out");
    }

    #[test]
    fn the_pool_hands_out_the_smallest_fitting_set_within_its_limit() {
        let bt = LAYOUT.block_tokens;
        let set =
            |blocks: usize| KvBuffers::allocate(LAYOUT.clone(), blocks * bt).expect("allocate");
        let mut pool = KvPool::new(10 * bt);
        pool.put(set(4));
        pool.put(set(3));
        assert_eq!(pool.held_tokens(), 7 * bt);
        // Best fit, and never more than twice what is asked.
        assert_eq!(pool.take(3 * bt).map(|b| b.capacity()), Some(3 * bt));
        assert!(pool.take(bt).is_none(), "4 blocks for 1: too large");
        assert!(pool.take(5 * bt).is_none(), "too small");
        // Over the limit the oldest sets go; a set larger than the limit is not kept.
        pool.put(set(5));
        pool.put(set(4));
        assert_eq!(pool.held_tokens(), 9 * bt);
        assert_eq!(pool.take(4 * bt).map(|b| b.capacity()), Some(4 * bt));
        pool.put(set(11));
        assert_eq!(pool.held_tokens(), 5 * bt);

        // A sequence given pooled buffers imports into them in place, bit-exactly, and
        // gives them back whole.
        let blocks: Vec<KvPayload> = (0..2).map(float_block).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut kv = SequenceKv::new(LAYOUT.clone());
        kv.adopt_buffers(pool.take(5 * bt).expect("the 5-block set"))
            .expect("adopt");
        kv.plan_import(2 * bt).expect("plan");
        assert_eq!(kv.capacity(), 5 * bt, "the pooled set is large enough");
        kv.import_blocks(&refs).expect("import");
        assert!(kv.export_blocks(0, 2, None).expect("export") == blocks);
        assert!(kv.adopt_buffers(set(2)).is_err(), "not empty");
        let back = kv.take_buffers().expect("buffers");
        assert_eq!((back.capacity(), kv.len(), kv.capacity()), (5 * bt, 0, 0));
    }

    #[test]
    fn half_precision_blocks_widen_exactly() {
        let n = LAYOUT.kv_heads * LAYOUT.block_tokens * LAYOUT.head_dim;
        for dtype in [TensorDtype::F16, TensorDtype::Bf16] {
            let raw: Vec<u16> = (0..n)
                .map(|j| (j as u16).wrapping_mul(37) & 0x7bff)
                .collect();
            let widened: Vec<f32> = raw
                .iter()
                .map(|&b| match dtype {
                    TensorDtype::F16 => half::f16::from_bits(b).to_f32(),
                    _ => half::bf16::from_bits(b).to_f32(),
                })
                .collect();
            let data: Vec<u8> = raw.iter().flat_map(|b| b.to_le_bytes()).collect();
            let tensors = (0..LAYOUT.num_layers)
                .flat_map(|i| ["k", "v"].map(|kind| format!("l{i}.{kind}")))
                .map(|name| KvTensor {
                    name,
                    dtype,
                    shape: vec![LAYOUT.kv_heads, LAYOUT.block_tokens, LAYOUT.head_dim],
                    data: data.clone().into(),
                })
                .collect();
            let p = KvPayload {
                encoding: KvEncoding::Float { dtype },
                tensors,
            };
            let mut kv = SequenceKv::new(LAYOUT.clone());
            kv.import_blocks(&[&p]).expect("import");
            let out = kv.export_blocks(0, 1, None).expect("export");
            let mut expected = vec![0u8; n * 4];
            encode_f32(&mut expected, &widened);
            assert!(
                out[0].tensors.iter().all(|t| t.data == expected),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn quantized_blocks_import_within_the_quantization_step() {
        let float = float_block_with(0, false);
        let mut kv = SequenceKv::new(LAYOUT.clone());
        kv.import_blocks(&[&float]).expect("import");
        for bits in [8u8, 4] {
            let q = kv
                .export_blocks(0, 1, Some(bits))
                .expect("export quantized");
            let mut back = SequenceKv::new(LAYOUT.clone());
            back.import_blocks(&[&q[0]]).expect("import quantized");
            let out = back.export_blocks(0, 1, None).expect("export");
            for (a, b) in out[0].tensors.iter().zip(&float.tensors) {
                let (mut x, mut y) = (vec![0f32; a.data.len() / 4], vec![0f32; b.data.len() / 4]);
                decode_f32(&mut x, &a.data, TensorDtype::F32).expect("decode");
                decode_f32(&mut y, &b.data, TensorDtype::F32).expect("decode");
                // Each group of 64 is quantized to 2^bits levels over its range.
                for (gx, gy) in x.chunks(64).zip(y.chunks(64)) {
                    let (lo, hi) = gy
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                    let step = (hi - lo) / ((1u32 << bits) - 1) as f32;
                    // Rounding to the nearest level is half a step, but MLX adjusts the
                    // scale so that the group's extreme is exact (a slightly larger step);
                    // then the f16 rounding of the scale and bias.
                    let bound = step + hi.abs().max(lo.abs()) * 2e-3;
                    for (p, q) in gx.iter().zip(gy) {
                        let err = (p - q).abs();
                        assert!(
                            err <= bound,
                            "{bits}-bit {}: {p} for {q} (error {err}, step {step})",
                            a.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_payloads_leave_the_sequence_unchanged() {
        let good = float_block(1);
        let mut kv = SequenceKv::new(LAYOUT.clone());
        kv.import_blocks(&[&good]).expect("import");
        let mut wrong_shape = float_block(2);
        wrong_shape.tensors[3].shape = vec![2, 64, 32];
        let mut missing = float_block(2);
        missing.tensors.pop();
        let mut u32_float = float_block(2);
        u32_float.encoding = KvEncoding::Float {
            dtype: TensorDtype::U32,
        };
        for t in &mut u32_float.tensors {
            t.dtype = TensorDtype::U32;
        }
        let mut short = float_block(2);
        short.tensors[0].data.truncate(10);
        for bad in [&wrong_shape, &missing, &u32_float, &short] {
            // Two blocks grow the buffers; one fits the spare block and would be decoded in
            // place.
            for payloads in [vec![&good, bad], vec![bad]] {
                assert!(matches!(
                    kv.import_blocks(&payloads),
                    Err(Error::KvPayload(_))
                ));
                assert_eq!(kv.len(), 64);
            }
        }
        assert!(kv.export_blocks(0, 1, None).expect("export")[0] == good);
    }

    #[test]
    fn byte_helpers_reject_mismatched_lengths() {
        let mut dst = [0f32; 4];
        assert!(decode_f32(&mut dst, &[0u8; 15], TensorDtype::F32).is_err());
        assert!(decode_f32(&mut dst, &[0u8; 16], TensorDtype::U32).is_err());
        assert!(decode_f32(&mut dst, &[0u8; 8], TensorDtype::F16).is_ok());
    }
}

/// In-place host access to the KV buffers (the host decode step).
///
/// Safety argument, relied on by the two `unsafe` blocks: a buffer handed out here is an
/// evaluated, row-contiguous f32 MLX array of exactly the expected size (`is_plain`
/// checks), owned by its [`SequenceKv`], which the caller borrows mutably for as long as
/// the slice lives. Its memory is its own: every buffer comes from an operation that
/// allocates its output (a materialized zeros copy, `concatenate` when growing, a slice
/// update, or an import built from host data), possibly handed on whole through the
/// [`KvPool`] from a released sequence (moved: the released one keeps no handle), and no
/// other live array shares it: the
/// only views ever taken of a buffer (the K/V returned by [`SequenceKv::write`], slices for
/// export) live within the call that made them, and the engine evaluates each step
/// synchronously, so no pending MLX work reads or writes the memory while the slice
/// exists. The pointer comes straight from MLX's C API (no Rust reference is turned into a
/// mutable one), and K and V are checked not to overlap.
mod host_access {
    #![allow(unsafe_code)]

    use super::{bad, Result};
    use mlx_rs::{Array, Dtype};

    /// Whether `a` is an evaluated, row-contiguous f32 array of `expected` elements.
    pub(super) fn is_plain(a: &Array, expected: usize) -> bool {
        a.dtype() == Dtype::Float32
            && a.size() == expected
            && a.try_as_slice::<f32>().is_ok_and(|s| s.len() == expected)
    }

    fn data_ptr(a: &mut Array, expected: usize) -> Result<*mut f32> {
        if !is_plain(a, expected) {
            return Err(bad("a KV buffer is not a plain evaluated array"));
        }
        // SAFETY: `a` is a valid, evaluated array (checked above); MLX returns the address
        // of its data (or null on error, checked below).
        let p = unsafe { mlx_sys::mlx_array_data_float32(a.as_ptr()) } as *mut f32;
        if p.is_null() {
            return Err(bad("a KV buffer has no data"));
        }
        Ok(p)
    }

    /// `a` (`expected` elements) as a mutable slice.
    pub(super) fn one_mut(a: &mut Array, expected: usize) -> Result<&mut [f32]> {
        let p = data_ptr(a, expected)?;
        // SAFETY: see the module comment: the pointer addresses `expected` f32 values of
        // memory owned by `a` alone, and nothing else accesses it while `a` is mutably
        // borrowed (the slice's lifetime).
        unsafe { Ok(std::slice::from_raw_parts_mut(p, expected)) }
    }

    /// `k` and `v` (each `expected` elements) as mutable slices.
    pub(super) fn pair_mut<'a>(
        k: &'a mut Array,
        v: &'a mut Array,
        expected: usize,
    ) -> Result<(&'a mut [f32], &'a mut [f32])> {
        let (pk, pv) = (data_ptr(k, expected)?, data_ptr(v, expected)?);
        let (ak, av) = (pk as usize, pv as usize);
        let bytes = expected * std::mem::size_of::<f32>();
        if expected > 0 && ak < av + bytes && av < ak + bytes {
            return Err(bad("K and V buffers overlap"));
        }
        // SAFETY: see the module comment: each pointer addresses `expected` f32 values of
        // memory owned by that array alone, nothing else accesses it while `k` and `v` are
        // mutably borrowed (the slices' lifetime), and the two ranges are disjoint.
        unsafe {
            Ok((
                std::slice::from_raw_parts_mut(pk, expected),
                std::slice::from_raw_parts_mut(pv, expected),
            ))
        }
    }
}
