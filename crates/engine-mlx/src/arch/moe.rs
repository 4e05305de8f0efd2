//! Sparse mixture-of-experts MLPs (Mixtral, Qwen3-MoE, DeepSeek's routed + shared experts):
//! the configuration read from a Hugging Face `config.json`, the routing rule and the layer.
//!
//! Per token: router logits over the experts, a softmax, the `top_k` most probable experts
//! (ties to the lower id), their probabilities renormalised when the model says so and
//! scaled by `routed_scale`; the output is the weighted sum of those experts' gated MLPs, in
//! ascending expert order, plus the shared expert where there is one. Mixtral's "softmax over
//! the top-k logits" is the same as renormalising the top-k of the full softmax.
//!
//! A token's output depends only on its own row, whatever else is in the batch or chunk: the
//! rows each expert receives are gathered, run, and added back in a fixed order.

use super::llama::{host_vec, rows_of};
use crate::config::{count, invalid, Activation, Experts, Family, ModelConfig};
use crate::error::Result;
use crate::host_decode;
use crate::weights::{Linear, RawTensor, TensorMap, WeightFormat};
use mlx_rs::Array;
use serde_json::Value;
use std::path::Path;

/// Mixture-of-experts options from a Hugging Face `config.json` (Mixtral, Qwen3-MoE).
pub fn from_hf(mut cfg: ModelConfig, path: &Path, v: &Value) -> Result<ModelConfig> {
    let uint = |k: &str| v.get(k).and_then(Value::as_u64);
    let layers = cfg.num_layers;
    let experts = match cfg.family {
        Family::Mixtral => Experts {
            count: count(path, "num_local_experts", uint("num_local_experts"))?,
            top_k: count(path, "num_experts_per_tok", uint("num_experts_per_tok"))?,
            expert_intermediate: cfg.intermediate_size,
            normalize_top_k: true,
            routed_scale: 1.0,
            shared_intermediate: None,
            layers: vec![true; layers],
            groups: None,
        },
        Family::DeepSeek2 => {
            let first_dense = uint("first_k_dense_replace").unwrap_or(0) as usize;
            let freq = uint("moe_layer_freq").unwrap_or(1).max(1) as usize;
            let expert_intermediate =
                count(path, "moe_intermediate_size", uint("moe_intermediate_size"))?;
            let shared = uint("n_shared_experts").unwrap_or(0) as usize;
            let groups = match v.get("topk_method").and_then(Value::as_str) {
                Some("group_limited_greedy") => {
                    let n = count(path, "n_group", uint("n_group"))?;
                    let keep = count(path, "topk_group", uint("topk_group"))?;
                    Some((n, keep))
                }
                _ => None,
            };
            if let Some(method) = v.get("scoring_func").and_then(Value::as_str) {
                if method != "softmax" {
                    return Err(invalid(
                        path,
                        "scoring_func",
                        format!("`{method}` is not supported (supported: softmax)"),
                    ));
                }
            }
            Experts {
                count: count(path, "n_routed_experts", uint("n_routed_experts"))?,
                top_k: count(path, "num_experts_per_tok", uint("num_experts_per_tok"))?,
                expert_intermediate,
                // DeepSeek-V2 weights the chosen experts by their full-softmax probability.
                normalize_top_k: false,
                routed_scale: v
                    .get("routed_scaling_factor")
                    .and_then(Value::as_f64)
                    .map_or(1.0, |f| f as f32),
                shared_intermediate: (shared > 0).then_some(shared * expert_intermediate),
                layers: (0..layers)
                    .map(|i| i >= first_dense && i % freq == 0)
                    .collect(),
                groups,
            }
        }
        _ => {
            let step = uint("decoder_sparse_step").unwrap_or(1).max(1) as usize;
            let dense: Vec<u64> = v
                .get("mlp_only_layers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            Experts {
                count: count(path, "num_experts", uint("num_experts"))?,
                top_k: count(path, "num_experts_per_tok", uint("num_experts_per_tok"))?,
                expert_intermediate: count(
                    path,
                    "moe_intermediate_size",
                    uint("moe_intermediate_size"),
                )?,
                normalize_top_k: v
                    .get("norm_topk_prob")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                routed_scale: 1.0,
                shared_intermediate: None,
                layers: (0..layers)
                    .map(|i| !dense.contains(&(i as u64)) && (i + 1) % step == 0)
                    .collect(),
                groups: None,
            }
        }
    };
    if let Some((n, keep)) = experts.groups {
        if !experts.count.is_multiple_of(n)
            || keep > n
            || experts.top_k > keep * (experts.count / n)
        {
            return Err(invalid(
                path,
                "n_group",
                format!(
                    "{} experts in {n} groups, {keep} kept, {} per token",
                    experts.count, experts.top_k
                ),
            ));
        }
    }
    cfg.experts = Some(experts);
    Ok(cfg)
}

/// Mixture-of-experts options from GGUF metadata (`<arch>.expert_count` > 0: Mixtral as
/// `llama`, `qwen3moe`, `deepseek2`), following llama.cpp's reading of the same keys: the
/// chosen weights are renormalised for `llama` and `qwen3moe` and, for `deepseek2`, as
/// `expert_weights_norm` says (default no) and scaled by `expert_weights_scale`; the first
/// `leading_dense_block_count` layers are dense; `expert_shared_count` shared experts of
/// `expert_feed_forward_length` each form one MLP; `expert_group_count` /
/// `expert_group_used_count` make the routing group-limited. The cfg is returned unchanged
/// when the file has no experts.
pub fn from_gguf(mut cfg: ModelConfig, h: &crate::gguf::GgufHeader) -> Result<ModelConfig> {
    let path = h.path.as_path();
    let arch = cfg.architecture.clone();
    let key = |s: &str| format!("{arch}.{s}");
    let uint = |s: &str| h.get(&key(s)).and_then(|v| v.as_u64());
    let Some(n) = uint("expert_count").filter(|&n| n > 0) else {
        return Ok(cfg);
    };
    let count_of = |s: &str| count(path, &key(s), uint(s));
    let top_k = count_of("expert_used_count")?;
    let expert_intermediate = match uint("expert_feed_forward_length") {
        Some(_) => count_of("expert_feed_forward_length")?,
        None => cfg.intermediate_size,
    };
    let deepseek = cfg.family == Family::DeepSeek2;
    let first_dense = uint("leading_dense_block_count").unwrap_or(0) as usize;
    let shared = uint("expert_shared_count").unwrap_or(0) as usize;
    let groups = match (uint("expert_group_count"), uint("expert_group_used_count")) {
        (Some(g), Some(k)) if g > 1 => Some((g as usize, k as usize)),
        _ => None,
    };
    if let Some(func) = uint("expert_gating_func") {
        // llama.cpp: 1 softmax, 2 sigmoid.
        if func != 1 {
            return Err(invalid(
                path,
                &key("expert_gating_func"),
                format!("gating function {func} is not supported (supported: 1, softmax)"),
            ));
        }
    }
    let experts = Experts {
        count: n as usize,
        top_k,
        expert_intermediate,
        normalize_top_k: if deepseek {
            h.get(&key("expert_weights_norm"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        } else {
            true
        },
        routed_scale: h
            .get(&key("expert_weights_scale"))
            .and_then(|v| v.as_f64())
            .map_or(1.0, |f| f as f32),
        shared_intermediate: (shared > 0).then_some(shared * expert_intermediate),
        layers: (0..cfg.num_layers).map(|i| i >= first_dense).collect(),
        groups,
    };
    cfg.experts = Some(experts);
    Ok(cfg)
}

/// The experts a token uses, ascending by id, with their weights: see the module docs.
/// `logits` are the router's outputs for one token (one per expert).
pub fn route(logits: &[f32], spec: &Experts) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if let Some((groups, keep)) = spec.groups {
        // Only the experts of the `keep` groups whose best expert is most probable (ties to
        // the lower group) are eligible.
        let size = (logits.len() / groups.max(1)).max(1);
        let best = |g: usize| {
            exps[g * size..((g + 1) * size).min(exps.len())]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max)
        };
        let mut ranked: Vec<usize> = (0..groups).collect();
        ranked.sort_by(|&a, &b| best(b).total_cmp(&best(a)));
        ranked.truncate(keep);
        order.retain(|e| ranked.contains(&(e / size)));
    }
    // Most probable first; equal probabilities keep the lower id first (a stable sort).
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]));
    order.truncate(spec.top_k.min(logits.len()));
    let chosen: f32 = order.iter().map(|&e| exps[e]).sum();
    let denominator = if spec.normalize_top_k { chosen } else { total };
    let mut picked: Vec<(usize, f32)> = order
        .into_iter()
        .map(|e| (e, exps[e] / denominator * spec.routed_scale))
        .collect();
    picked.sort_by_key(|&(e, _)| e);
    picked
}

/// One expert: a gated MLP (`down(act(gate · x) · (up · x))`).
#[derive(Debug)]
struct Expert {
    gate_up: Linear,
    down: Linear,
    inter: usize,
}

impl Expert {
    fn load(
        w: &mut TensorMap,
        names: [String; 3],
        shape: (i64, i64),
        fmt: WeightFormat,
        host: bool,
    ) -> Result<Self> {
        let (inter, hidden) = shape;
        let [gate, up, down] = names;
        let mut take = |name: &str, shape: &[i64]| -> Result<RawTensor> {
            let t = w.take(name)?;
            w.check_shape(name, &t, shape)?;
            Ok(t)
        };
        let g = take(&gate, &[inter, hidden])?;
        let u = take(&up, &[inter, hidden])?;
        let d = take(&down, &[hidden, inter])?;
        Ok(Expert {
            gate_up: Linear::fused(vec![g, u], vec![None, None], fmt, host)?,
            down: Linear::fused(vec![d], vec![None], fmt, host)?,
            inter: inter as usize,
        })
    }

    /// The expert on `x` (`[rows, hidden]`), as host values `[rows, hidden]`.
    fn forward(&self, x: &Array, activation: Activation, decode: bool) -> Result<Vec<f32>> {
        let gu = self.gate_up.apply(x, None, decode)?;
        let gu = host_vec(&gu)?;
        let rows = gu.len() / (2 * self.inter).max(1);
        let mut a = vec![0.0f32; rows * self.inter];
        host_decode::gated(&gu, self.inter, activation, &mut a);
        let a = Array::from_slice(&a, &[rows_of(rows)?, rows_of(self.inter)?]);
        host_vec(&self.down.apply(&a, None, decode)?)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = self.gate_up.arrays();
        v.extend(self.down.arrays());
        v
    }
}

/// A mixture-of-experts MLP layer.
#[derive(Debug)]
pub struct MoeMlp {
    router: Linear,
    experts: Vec<Expert>,
    shared: Option<Expert>,
    spec: Experts,
    hidden: usize,
}

impl MoeMlp {
    /// Takes layer `i`'s router (`ffn_gate_inp`), experts (`ffn_{gate,up,down}_exps.E`) and
    /// shared expert (`ffn_{gate,up,down}_shexp`) from `w`.
    pub fn load(
        w: &mut TensorMap,
        i: usize,
        c: &ModelConfig,
        fmt: WeightFormat,
        host: bool,
    ) -> Result<Self> {
        let spec = c.experts.clone().ok_or_else(|| {
            crate::error::Error::Request("an MoE layer in a model without experts".into())
        })?;
        let hidden = c.hidden_size as i64;
        let router_name = format!("blk.{i}.ffn_gate_inp.weight");
        let router = w.take(&router_name)?;
        w.check_shape(&router_name, &router, &[spec.count as i64, hidden])?;
        let router = Linear::fused(vec![router], vec![None], fmt, host)?;
        let inter = spec.expert_intermediate as i64;
        let experts = (0..spec.count)
            .map(|e| {
                let names =
                    ["gate", "up", "down"].map(|k| format!("blk.{i}.ffn_{k}_exps.{e}.weight"));
                Expert::load(w, names, (inter, hidden), fmt, host)
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match spec.shared_intermediate {
            Some(width) => {
                let names = ["gate", "up", "down"].map(|k| format!("blk.{i}.ffn_{k}_shexp.weight"));
                Some(Expert::load(w, names, (width as i64, hidden), fmt, host)?)
            }
            None => None,
        };
        Ok(MoeMlp {
            router,
            experts,
            shared,
            spec,
            hidden: c.hidden_size,
        })
    }

    /// The layer's output for the normed hidden states `h` (`[rows, hidden]`), before the
    /// residual add.
    pub fn forward(&self, h: &Array, activation: Activation, decode: bool) -> Result<Array> {
        let hidden = self.hidden;
        let logits = host_vec(&self.router.apply(h, None, decode)?)?;
        let x = host_vec(h)?;
        let rows = x.len() / hidden.max(1);
        if logits.len() != rows * self.spec.count {
            return Err(crate::error::Error::HostKernel(
                "router output does not match the experts".into(),
            ));
        }
        // Per expert, the rows routed to it and their weights.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (r, l) in logits.chunks_exact(self.spec.count).enumerate() {
            for (e, weight) in route(l, &self.spec) {
                assigned[e].push((r, weight));
            }
        }
        let mut out = vec![0.0f32; rows * hidden];
        for (expert, rows_of_expert) in self.experts.iter().zip(&assigned) {
            if rows_of_expert.is_empty() {
                continue;
            }
            let mut gathered = Vec::with_capacity(rows_of_expert.len() * hidden);
            for &(r, _) in rows_of_expert {
                gathered.extend_from_slice(&x[r * hidden..][..hidden]);
            }
            let input = Array::from_slice(
                &gathered,
                &[rows_of(rows_of_expert.len())?, rows_of(hidden)?],
            );
            let y = expert.forward(&input, activation, decode)?;
            for (&(r, weight), yr) in rows_of_expert.iter().zip(y.chunks_exact(hidden)) {
                for (o, &v) in out[r * hidden..][..hidden].iter_mut().zip(yr) {
                    *o += weight * v;
                }
            }
        }
        if let Some(shared) = &self.shared {
            let y = shared.forward(h, activation, decode)?;
            for (o, v) in out.iter_mut().zip(y) {
                *o += v;
            }
        }
        Ok(Array::from_slice(&out, &[rows_of(rows)?, rows_of(hidden)?]))
    }

    /// Every weight array.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.router.arrays();
        for e in self.experts.iter().chain(self.shared.iter()) {
            v.extend(e.arrays());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(top_k: usize, normalize: bool, scale: f32) -> Experts {
        Experts {
            count: 4,
            top_k,
            expert_intermediate: 8,
            normalize_top_k: normalize,
            routed_scale: scale,
            shared_intermediate: None,
            layers: vec![true],
            groups: None,
        }
    }

    #[test]
    fn top_k_of_the_softmax_in_expert_order() {
        let logits = [0.5, 2.0, -1.0, 1.0];
        let total: f32 = logits.iter().map(|l: &f32| l.exp()).sum();
        let got = route(&logits, &spec(2, false, 1.0));
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((got[0].1 - 2f32.exp() / total).abs() < 1e-6);
        assert!((got[1].1 - 1f32.exp() / total).abs() < 1e-6);
    }

    #[test]
    fn renormalised_weights_equal_a_softmax_over_the_chosen_logits() {
        // Mixtral's definition: softmax over the top-k logits.
        let logits = [0.5, 2.0, -1.0, 1.0];
        let got = route(&logits, &spec(2, true, 1.0));
        let z = 2f32.exp() + 1f32.exp();
        assert!((got[0].1 - 2f32.exp() / z).abs() < 1e-6);
        assert!((got[1].1 - 1f32.exp() / z).abs() < 1e-6);
        let scaled = route(&logits, &spec(2, true, 16.0));
        assert!((scaled[0].1 - 16.0 * got[0].1).abs() < 1e-5);
    }

    #[test]
    fn group_limited_routing_picks_within_the_best_groups() {
        // Groups {0,1}, {2,3}, {4,5} with best members 3.0, 2.9, 0.2: keeping one group
        // leaves expert 2 (2.9, the plain second choice) out.
        let logits = [3.0, 0.0, 2.9, 0.5, 0.1, 0.2];
        let mut s = spec(2, false, 1.0);
        s.count = 6;
        s.groups = Some((3, 1));
        let picked: Vec<usize> = route(&logits, &s).iter().map(|p| p.0).collect();
        assert_eq!(picked, vec![0, 1]);
        s.groups = None;
        let plain: Vec<usize> = route(&logits, &s).iter().map(|p| p.0).collect();
        assert_eq!(plain, vec![0, 2]);
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let got = route(&[1.0, 1.0, 1.0, 0.0], &spec(2, true, 1.0));
        assert_eq!(got, vec![(0, 0.5), (1, 0.5)]);
    }
}
