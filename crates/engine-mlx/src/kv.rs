//! Per-sequence KV buffers: one K and one V array per layer, `[1, kv_heads, capacity,
//! head_dim]`, grown a block at a time and written with slice updates; whole blocks are
//! exported to bytes and imported back bit-exactly.

use crate::error::{Error, MlxContext, Result};
use agent_session::{KvEncoding, KvPayload, KvTensor, TensorDtype};
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers with a KV cache.
    pub num_layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension (K and V).
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
}

/// The KV state of one sequence.
#[derive(Debug)]
pub struct SequenceKv {
    layout: KvLayout,
    /// Per layer: (K, V), each `[1, kv_heads, capacity, head_dim]` f32; empty until the
    /// first write.
    layers: Vec<(Array, Array)>,
    len: usize,
    capacity: usize,
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

impl SequenceKv {
    /// An empty sequence.
    pub fn new(layout: KvLayout) -> Self {
        Self {
            layout,
            layers: Vec::new(),
            len: 0,
            capacity: 0,
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

    /// Allocated token capacity (a multiple of the block size).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The layout.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Makes room for `total` tokens, growing by whole blocks.
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        if total <= self.capacity {
            return Ok(());
        }
        let bt = self.layout.block_tokens.max(1);
        let new_cap = total.div_ceil(bt) * bt;
        let grow = i32_of(new_cap - self.capacity)?;
        let shape = [
            1,
            i32_of(self.layout.kv_heads)?,
            grow,
            i32_of(self.layout.head_dim)?,
        ];
        if self.layers.is_empty() {
            for _ in 0..self.layout.num_layers {
                let k = Array::zeros::<f32>(&shape).ctx("allocating KV")?;
                let v = Array::zeros::<f32>(&shape).ctx("allocating KV")?;
                self.layers.push((k, v));
            }
        } else {
            let zeros = Array::zeros::<f32>(&shape).ctx("allocating KV")?;
            for (k, v) in &mut self.layers {
                *k = ops::concatenate(&[&*k, &zeros], 2).ctx("growing KV")?;
                *v = ops::concatenate(&[&*v, &zeros], 2).ctx("growing KV")?;
            }
        }
        self.capacity = new_cap;
        self.host_ready = false;
        Ok(())
    }

    /// Writes `k_new`/`v_new` (`[1, kv_heads, n, head_dim]`) of `layer` at the current end
    /// (after [`SequenceKv::reserve`]) and returns K and V over everything up to the new end.
    /// The length advances only with [`SequenceKv::advance`], once all layers are written.
    pub fn write(&mut self, layer: usize, k_new: &Array, v_new: &Array) -> Result<(Array, Array)> {
        let n = k_new.shape().get(2).copied().unwrap_or(0);
        let start = i32_of(self.len)?;
        let end = start + n;
        let (k, v) = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| bad(format!("layer {layer} out of range")))?;
        self.host_ready = false;
        k.try_index_mut((.., .., start..end, ..), k_new)
            .ctx("writing K")?;
        v.try_index_mut((.., .., start..end, ..), v_new)
            .ctx("writing V")?;
        let keys = k.try_index((.., .., ..end, ..)).ctx("slicing K")?;
        let values = v.try_index((.., .., ..end, ..)).ctx("slicing V")?;
        Ok((keys, values))
    }

    /// The K and V buffers of `layer`, `[1, kv_heads, capacity, head_dim]` (after the first
    /// [`SequenceKv::reserve`]).
    pub fn layer(&self, layer: usize) -> Result<(&Array, &Array)> {
        self.layers
            .get(layer)
            .map(|(k, v)| (k, v))
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
        let expected = self.host_elements();
        for (k, v) in &mut self.layers {
            for buf in [k, v] {
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

    fn host_elements(&self) -> usize {
        self.layout.kv_heads * self.capacity * self.layout.head_dim
    }

    /// K and V of `layer` as mutable host memory, each `[kv_heads, capacity, head_dim]`
    /// row-major: the decode step on the host reads the cached tokens and writes the new
    /// token's K/V in place (position [`SequenceKv::len`], then
    /// [`SequenceKv::advance`]). Needs [`SequenceKv::prepare_host`] since the buffers last
    /// changed.
    pub fn host_layer_mut(&mut self, layer: usize) -> Result<(&mut [f32], &mut [f32])> {
        if !self.host_ready {
            return Err(bad("KV buffers not prepared for host access"));
        }
        let expected = self.host_elements();
        let (k, v) = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| bad(format!("layer {layer} out of range")))?;
        host_access::pair_mut(k, v, expected)
    }

    /// Marks `n` more tokens as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Every buffer (to evaluate them together with the logits).
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.layers.iter().flat_map(|(k, v)| [k, v])
    }

    /// Cuts the sequence back to `tokens` tokens (the buffers keep their capacity) and
    /// forgets an announced import.
    pub fn truncate(&mut self, tokens: usize) {
        self.len = self.len.min(tokens);
        self.import_plan = 0;
    }

    /// Takes the buffers out, leaving the sequence empty with none; `None` when it has
    /// none. For the engine's [`KvPool`].
    pub fn take_buffers(&mut self) -> Option<KvBuffers> {
        let layers = std::mem::take(&mut self.layers);
        let capacity = std::mem::replace(&mut self.capacity, 0);
        self.len = 0;
        self.import_plan = 0;
        self.host_ready = false;
        (!layers.is_empty()).then_some(KvBuffers { layers, capacity })
    }

    /// Gives an empty sequence `buffers` (from the engine's [`KvPool`]) in place of its own.
    /// Their capacity only changes where the next tokens are written, never a value: the
    /// attention reads the first `len` positions alone.
    pub fn adopt_buffers(&mut self, buffers: KvBuffers) -> Result<()> {
        if self.len != 0 {
            return Err(bad("buffers can only be given to an empty sequence"));
        }
        self.layers = buffers.layers;
        self.capacity = buffers.capacity;
        self.import_plan = 0;
        self.host_ready = false;
        Ok(())
    }

    /// Announces that the next [`SequenceKv::import_blocks`] calls append `tokens` tokens
    /// in all, and sizes the buffers for them now, as one import of them all would: the
    /// caller reads the blocks meanwhile, and each part is then decoded straight into the
    /// buffers.
    pub fn plan_import(&mut self, tokens: usize) -> Result<()> {
        self.import_plan = self.len + tokens;
        if tokens == 0 {
            return Ok(());
        }
        if self.len == 0 {
            let capacity = import_capacity(self.layout.block_tokens, tokens);
            if self.capacity < capacity {
                // Zeros built on several threads as host data (an import of no block).
                self.layers = self.import_tensors(&[], capacity)?;
                self.capacity = capacity;
                self.host_ready = false;
            }
        } else {
            self.reserve(self.import_plan)?;
        }
        self.prepare_host()
    }

    fn block_range(&self, block: usize) -> Result<(i32, i32)> {
        let bt = self.layout.block_tokens;
        let start = block * bt;
        if start + bt > self.len {
            return Err(Error::Request(format!(
                "block {block} is not complete (sequence has {} tokens, block size {bt})",
                self.len
            )));
        }
        Ok((i32_of(start)?, i32_of(start + bt)?))
    }

    /// Copies blocks `first..first + count` out as bytes: `l{i}.k` / `l{i}.v`, `[kv_heads,
    /// block_tokens, head_dim]` f32 (bit-exact), or with `kv_bits` MLX affine quantization
    /// with group 64: `l{i}.k` (u32), `l{i}.k.scales`, `l{i}.k.biases` (f16).
    ///
    /// Float blocks are copied straight from each layer's evaluated buffer into the payload's
    /// bytes (one copy, no intermediate MLX array).
    pub fn export_blocks(
        &self,
        first: usize,
        count: usize,
        kv_bits: Option<u8>,
    ) -> Result<Vec<KvPayload>> {
        for b in first..first + count {
            self.block_range(b)?;
        }
        match kv_bits {
            None => self.export_float(first, count),
            Some(bits) => self.export_quantized(first, count, bits),
        }
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
        for (i, (k, v)) in self.layers.iter().enumerate() {
            for (kind, buf) in [("k", k), ("v", v)] {
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
                // `[1, kv_heads, capacity, head_dim]`: head h's rows of block b are
                // `per_head` values at `(h * capacity + b * bt) * head_dim`.
                if data.len() != kv_heads * self.capacity * head_dim {
                    return Err(bad(format!(
                        "KV buffer of layer {i} holds {} values, expected {}",
                        data.len(),
                        kv_heads * self.capacity * head_dim
                    )));
                }
                for (tensors, b) in out.iter_mut().zip(first..) {
                    let mut bytes = vec![0u8; kv_heads * per_head * 4];
                    for (h, dst) in bytes.chunks_exact_mut(per_head * 4).enumerate() {
                        let at = (h * self.capacity + b * bt) * head_dim;
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
            let (s, e) = self.block_range(b)?;
            // Quantized slices of every layer, evaluated together.
            let mut named: Vec<(String, Array)> = Vec::new();
            for (i, (k, v)) in self.layers.iter().enumerate() {
                for (kind, buf) in [("k", k), ("v", v)] {
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

    /// Appends whole blocks (the sequence length must be a multiple of the block size).
    ///
    /// Every payload is checked before the sequence changes, so a bad payload leaves it as
    /// it was. Into an empty sequence, float blocks are decoded on the host into one
    /// `[1, kv_heads, capacity, head_dim]` array per layer and K/V (one copy into a reused
    /// scratch buffer, one into MLX) that become the buffers themselves, with room for the
    /// rest of an announced import ([`SequenceKv::plan_import`]) and
    /// [`IMPORT_SPARE_BLOCKS`] more blocks. When the buffers already have room, float
    /// blocks are decoded straight into them; otherwise the buffers grow and the blocks are
    /// written after the current end.
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
        if self.len + n <= self.capacity && payloads.iter().all(|p| float_dtype(p).is_some()) {
            // Room already there (sized by an announced import, or left by a truncation):
            // decode straight into the buffers.
            self.import_in_place(payloads)?;
        } else if self.len == 0 {
            // The imported arrays become the buffers: give them the room of the whole
            // announced import and the next prefill needs anyway.
            let capacity = import_capacity(bt, end);
            let imported = self.import_tensors(payloads, capacity)?;
            self.layers = imported;
            self.capacity = capacity;
            self.host_ready = false;
        } else {
            let imported = self.import_tensors(payloads, n)?;
            self.reserve(end)?;
            let start = i32_of(self.len)?;
            let stop = i32_of(self.len + n)?;
            for ((k, v), (kn, vn)) in self.layers.iter_mut().zip(imported) {
                k.try_index_mut((.., .., start..stop, ..), &kn)
                    .ctx("writing imported K")?;
                v.try_index_mut((.., .., start..stop, ..), &vn)
                    .ctx("writing imported V")?;
            }
            self.host_ready = false;
        }
        mlx_rs::transforms::eval(self.arrays()).ctx("importing KV")?;
        self.len += n;
        if self.len >= self.import_plan {
            self.import_plan = 0;
        }
        Ok(())
    }

    /// Decodes float payloads on the host straight into the buffers after the current
    /// end (which must have room for them), layers split over up to [`IMPORT_THREADS`]
    /// threads. Every tensor is checked first, so a bad payload writes nothing.
    fn import_in_place(&mut self, payloads: &[&KvPayload]) -> Result<()> {
        let KvLayout {
            num_layers,
            kv_heads: kvh,
            head_dim: hd,
            block_tokens: bt,
        } = self.layout;
        let mut sources = Vec::with_capacity(payloads.len());
        for p in payloads {
            let dtype = float_dtype(p).ok_or_else(|| bad("not a float block"))?;
            let mut layers = Vec::with_capacity(num_layers);
            for i in 0..num_layers {
                let k = find(p, &format!("l{i}.k"), dtype, &[kvh, bt, hd])?;
                let v = find(p, &format!("l{i}.v"), dtype, &[kvh, bt, hd])?;
                layers.push([k, v]);
            }
            sources.push((dtype, layers));
        }
        self.prepare_host()?;
        let (start, capacity) = (self.len, self.capacity);
        let expected = self.host_elements();
        let mut buffers = Vec::with_capacity(num_layers);
        for (k, v) in &mut self.layers {
            let (k, v) = host_access::pair_mut(k, v, expected)?;
            buffers.push([k, v]);
        }
        let per_head = bt * hd;
        let fill = |first: usize, part: &mut [[&mut [f32]; 2]]| -> Result<()> {
            for (i, pair) in part.iter_mut().enumerate() {
                for (which, buf) in pair.iter_mut().enumerate() {
                    for (b, (dtype, layers)) in sources.iter().enumerate() {
                        let tensor = layers[first + i][which];
                        let row = (start + b * bt) * hd;
                        let heads = tensor.data.chunks_exact(per_head * dtype.size());
                        for (h, src) in heads.enumerate() {
                            let at = h * capacity * hd + row;
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

    /// Every layer's K and V of the payloads, as [`SequenceKv::import_tensor`] builds them.
    /// The tensors are split over up to [`IMPORT_THREADS`] threads: building them is host
    /// work (decoding, and the copy into fresh MLX memory, whose page faults dominate), and
    /// creating an MLX array from host data touches no stream, so it may run off the
    /// engine thread. The split never changes a value.
    fn import_tensors(
        &self,
        payloads: &[&KvPayload],
        capacity: usize,
    ) -> Result<Vec<(Array, Array)>> {
        let names: Vec<String> = (0..self.layout.num_layers)
            .flat_map(|i| [format!("l{i}.k"), format!("l{i}.v")])
            .collect();
        // Only float blocks are decoded on the host alone; quantized ones go through MLX
        // operations, which stay on the engine thread.
        let host_only = payloads.iter().all(|p| float_dtype(p).is_some());
        let threads = if host_only {
            import_threads().min(names.len()).max(1)
        } else {
            1
        };
        let layout = self.layout;
        let build = |first: usize| -> Result<Vec<(usize, Array)>> {
            let mut scratch = Vec::new();
            let mut out = Vec::new();
            for (at, name) in names.iter().enumerate().skip(first).step_by(threads) {
                out.push((
                    at,
                    Self::import_tensor(layout, payloads, name, capacity, &mut scratch)?,
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
        while let (Some(Some(k)), Some(Some(v))) = (it.next(), it.next()) {
            layers.push((k, v));
        }
        if layers.len() != self.layout.num_layers {
            return Err(bad("a KV import thread lost a tensor"));
        }
        Ok(layers)
    }

    /// Tensor `name` of every payload, in order, as one `[1, kv_heads, capacity, head_dim]`
    /// f32 array: the blocks' tokens first, zeros after them. `scratch` is reused between
    /// calls.
    fn import_tensor(
        layout: KvLayout,
        payloads: &[&KvPayload],
        name: &str,
        capacity: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<Array> {
        let KvLayout {
            kv_heads: kvh,
            head_dim: hd,
            block_tokens: bt,
            ..
        } = layout;
        let n = payloads.len() * bt;
        let shape = [1, i32_of(kvh)?, i32_of(capacity)?, i32_of(hd)?];
        // MLX sizes arrays with i32 element counts.
        let elements = kvh
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(hd))
            .ok_or_else(|| bad(format!("{n} imported tokens exceed the tensor size limit")))?;
        i32_of(elements)?;
        if payloads.iter().all(|p| float_dtype(p).is_some()) {
            // Head h of block b goes to rows `b * bt..(b + 1) * bt` of head h; the rows past
            // the blocks stay zero (never written between calls).
            let per_head = bt * hd;
            if scratch.len() != elements {
                *scratch = vec![0.0; elements];
            }
            for (b, p) in payloads.iter().enumerate() {
                let dtype = float_dtype(p).unwrap_or(TensorDtype::F32);
                let t = find(p, name, dtype, &[kvh, bt, hd])?;
                let src_head = per_head * dtype.size();
                for (dst, src) in scratch
                    .chunks_exact_mut(capacity * hd)
                    .zip(t.data.chunks_exact(src_head))
                {
                    decode_f32(&mut dst[b * per_head..(b + 1) * per_head], src, dtype)
                        .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                }
            }
            return Ok(Array::from_slice(scratch, &shape));
        }
        let mut blocks = Vec::with_capacity(payloads.len());
        for p in payloads {
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
        if capacity > n {
            blocks.push(
                Array::zeros::<f32>(&[i32_of(kvh)?, i32_of(capacity - n)?, i32_of(hd)?])
                    .ctx("allocating KV")?,
            );
        }
        let joined = ops::concatenate(&blocks, 1).ctx("joining imported KV")?;
        joined.reshape(&shape).ctx("reshaping imported KV")
    }
}

/// One sequence's K and V buffers for every layer, with their capacity in tokens.
#[derive(Debug)]
pub struct KvBuffers {
    layers: Vec<(Array, Array)>,
    capacity: usize,
}

impl KvBuffers {
    /// Fresh, evaluated zero buffers of at least `capacity` tokens (an import's capacity,
    /// [`import_capacity`]), built on several threads.
    pub fn allocate(layout: KvLayout, capacity: usize) -> Result<Self> {
        let mut kv = SequenceKv::new(layout);
        kv.plan_import(capacity.saturating_sub(IMPORT_SPARE_BLOCKS * layout.block_tokens))?;
        kv.take_buffers()
            .ok_or_else(|| bad("no KV buffers were allocated"))
    }

    /// Capacity in tokens.
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

    const LAYOUT: KvLayout = KvLayout {
        num_layers: 2,
        kv_heads: 2,
        head_dim: 64,
        block_tokens: 64,
    };

    /// A float block whose values encode (seed, layer, kind, index); with `extremes`, a few
    /// negative zeros, subnormals and huge values are mixed in (bit patterns must survive).
    fn float_block_with(seed: u32, extremes: bool) -> KvPayload {
        let n = LAYOUT.kv_heads * LAYOUT.block_tokens * LAYOUT.head_dim;
        let mut tensors = Vec::new();
        for i in 0..LAYOUT.num_layers {
            for (k, kind) in ["k", "v"].into_iter().enumerate() {
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
                    shape: vec![LAYOUT.kv_heads, LAYOUT.block_tokens, LAYOUT.head_dim],
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
        let mut kv = SequenceKv::new(LAYOUT);
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
        kv.truncate(0);
        kv.import_blocks(&refs[1..2])
            .expect("import after truncate");
        assert!(kv.export_blocks(0, 1, None).expect("export") == blocks[1..2]);
    }

    #[test]
    fn a_planned_import_in_parts_equals_one_import() {
        let bt = LAYOUT.block_tokens;
        let blocks: Vec<KvPayload> = (0..5).map(float_block).collect();
        let refs: Vec<&KvPayload> = blocks.iter().collect();
        let mut whole = SequenceKv::new(LAYOUT);
        whole.import_blocks(&refs).expect("one import");

        // Into an empty sequence: the plan sizes the buffers for all.
        let mut parts = SequenceKv::new(LAYOUT);
        parts.plan_import(5 * bt).expect("plan");
        assert_eq!(parts.capacity(), whole.capacity(), "sized by the plan");
        for part in refs.chunks(2) {
            parts.import_blocks(part).expect("import a part");
            assert_eq!(parts.capacity(), whole.capacity(), "sized once");
        }
        assert_eq!(parts.len(), whole.len());
        assert!(parts.export_blocks(0, 5, None).expect("export") == blocks);

        // After existing blocks: one growth for the whole announced import, then in place.
        let mut grown = SequenceKv::new(LAYOUT);
        grown.import_blocks(&refs[..1]).expect("first block");
        grown.plan_import(4 * bt).expect("plan");
        assert_eq!(grown.capacity(), 5 * bt);
        grown.import_blocks(&refs[1..3]).expect("second part");
        grown.import_blocks(&refs[3..]).expect("third part");
        assert_eq!((grown.len(), grown.capacity()), (5 * bt, 5 * bt));
        assert!(grown.export_blocks(0, 5, None).expect("export") == blocks);

        // Planned but cut short by a truncation: what was imported stays exact, and a
        // later import past the buffers grows them.
        let mut cut = SequenceKv::new(LAYOUT);
        cut.plan_import(3 * bt).expect("plan");
        cut.import_blocks(&refs[..1]).expect("import");
        cut.truncate(bt);
        cut.import_blocks(&refs[1..]).expect("import past the plan");
        assert_eq!((cut.len(), cut.capacity()), (5 * bt, 5 * bt));
        assert!(cut.export_blocks(0, 5, None).expect("export") == blocks);
    }

    #[test]
    fn the_pool_hands_out_the_smallest_fitting_set_within_its_limit() {
        let bt = LAYOUT.block_tokens;
        let set = |blocks: usize| KvBuffers::allocate(LAYOUT, blocks * bt).expect("allocate");
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
        let mut kv = SequenceKv::new(LAYOUT);
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
            let mut kv = SequenceKv::new(LAYOUT);
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
        let mut kv = SequenceKv::new(LAYOUT);
        kv.import_blocks(&[&float]).expect("import");
        for bits in [8u8, 4] {
            let q = kv
                .export_blocks(0, 1, Some(bits))
                .expect("export quantized");
            let mut back = SequenceKv::new(LAYOUT);
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
        let mut kv = SequenceKv::new(LAYOUT);
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
