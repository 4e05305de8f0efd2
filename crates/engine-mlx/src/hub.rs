//! Hugging Face model ids (`org/name`): files from the local hub cache, else downloaded with
//! a progress bar. Offline, or for an unknown id, a clear [`Error::Hub`].

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Whether `s` looks like a hub id (`org/name`, no path syntax).
pub fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(org), Some(name), None) => {
            let ok = |p: &str| {
                !p.is_empty()
                    && !p.starts_with('.')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            };
            ok(org) && ok(name)
        }
        _ => false,
    }
}

/// Files a safetensors model directory needs (weights are listed by the index when sharded).
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

fn hub_err(id: &str, reason: impl std::fmt::Display) -> Error {
    Error::Hub {
        id: id.to_owned(),
        reason: reason.to_string(),
    }
}

/// Shard names from `model.safetensors.index.json`.
fn shards_of(index: &Path, id: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| hub_err(id, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| hub_err(id, e))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| hub_err(id, "model.safetensors.index.json has no weight_map"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Resolves a hub id to a local snapshot directory, downloading what is missing.
pub fn fetch(id: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let cache = match cache_dir {
        Some(d) => hf_hub::Cache::new(d.to_path_buf()),
        None => hf_hub::Cache::from_env(),
    };
    let cached = cache.model(id.to_owned());
    // Fully cached: no network at all.
    if let Some(config) = cached.get("config.json") {
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        let weights_ok = match cached.get("model.safetensors.index.json") {
            Some(index) => shards_of(&index, id)?
                .iter()
                .all(|s| cached.get(s).is_some()),
            None => cached.get("model.safetensors").is_some(),
        };
        if weights_ok && REQUIRED.iter().all(|f| cached.get(f).is_some()) {
            return Ok(dir);
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| hub_err(id, e))?;
    let repo = api.model(id.to_owned());
    let offline = |e: hf_hub::api::sync::ApiError| {
        hub_err(
            id,
            format!("{e} (no network, an unknown id, or a gated model; files are cached under the hub cache dir)"),
        )
    };
    let config = repo.get("config.json").map_err(offline)?;
    for f in REQUIRED {
        repo.get(f).map_err(offline)?;
    }
    for f in OPTIONAL {
        let _ = repo.get(f);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shards_of(&index, id)? {
                repo.get(&shard).map_err(offline)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(offline)?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("./x/y"));
        assert!(!looks_like_hub_id("model.gguf"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
