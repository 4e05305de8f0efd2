//! What a model will take in RAM, and what the machine has: checked before any weight is
//! read, so a model too large is refused with a clear error instead of the process being
//! killed by the kernel half-way through loading.

use crate::gguf::GgufHeader;
use crate::weights::WeightFormat;

/// Memory the runtime needs besides weights and KV (MLX, tokenizer, buffers of one
/// forward pass), in bytes.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 300 << 20;

/// The estimated resident size of a GGUF model's weights in `format`.
///
/// [`WeightFormat::Host`] keeps 2-D tensors as the file's blocks and widens the rest (norms,
/// biases) to f32; [`WeightFormat::F32`] widens everything; [`WeightFormat::Quantized`] keeps
/// 4-bit types at MLX's 4-bit size and the rest at 8 bits (groups of 32 with f32 scale and
/// bias: 1.25 and 0.75 bytes a weight, plus the affine scale/bias) .
pub fn resident_weight_bytes(header: &GgufHeader, format: WeightFormat) -> u64 {
    header
        .tensors
        .iter()
        .map(|t| {
            let elems: u64 = t.shape.iter().product();
            // Stacked experts stay as blocks like matrices (one matrix per expert).
            let dims = if t.shape.len() == 3 && t.name.ends_with("_exps.weight") {
                2
            } else {
                t.shape.len()
            };
            match (format, dims) {
                (WeightFormat::Host, 2) => t.n_bytes,
                (WeightFormat::Quantized, 2) => {
                    let four_bit = matches!(t.ggml_type.name(), "Q4_0" | "Q4_1");
                    // codes + one f32 scale and bias per 32
                    elems * if four_bit { 4 } else { 8 } / 8 + elems / 32 * 8
                }
                _ => elems * 4,
            }
        })
        .sum()
}

/// Bytes of RAM available to this process: `MemAvailable` of /proc/meminfo, lowered to the
/// room left under a cgroup (v2) memory limit when one is set; `None` where neither can be
/// read (macOS).
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = parse_meminfo_available(&meminfo)?;
    let cgroup = (|| {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        let max: u64 = max.trim().parse().ok()?; // "max" (no limit) does not parse
        let current: u64 = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(max.saturating_sub(current))
    })();
    Some(cgroup.map_or(available, |c| c.min(available)))
}

/// `MemAvailable` in bytes from the text of /proc/meminfo.
pub fn parse_meminfo_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// The name of a GGUF `general.file_type` (llama.cpp's `llama_ftype`): what the file calls
/// its quantization as a whole (`Q4_K_M`); `None` for unknown values.
pub fn file_type_name(id: u64) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_available_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(20_000_000 * 1024));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo_available("MemAvailable: lots\n"), None);
    }

    #[test]
    fn file_types_have_llama_cpp_names() {
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(3), Some("Q4_1"));
        assert_eq!(file_type_name(25), Some("IQ4_NL"));
        assert_eq!(file_type_name(4), None);
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if cfg!(target_os = "linux") {
            assert!(available_bytes().is_some_and(|b| b > 0));
        }
    }
}
