//! The tier against a real S3-compatible server (`s3s-fs` on 127.0.0.1, installed by
//! `cargo xtask test`): uploads are the local files' bytes, another replica restores them,
//! a stale manifest is refused, and a store that goes down and comes back is caught up.

use agent_session::{
    AgentId, AgentKey, AgentManifest, BlockMeta, CacheStore, KvBlock, KvEncoding, KvPayload,
    KvTensor, Namespace, TensorDtype,
};
use block_pool::BlockHash;
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use cache_store_object::test_server::{require_server, S3TestServer};
use cache_store_object::{build_s3, ObjectTierConfig, ObjectTierStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FP: &str = "s3-test-model";
const BLOCK: usize = 64;
const PREFIX: &str = "it";

fn chain(n: usize, seed: u32) -> Vec<Arc<KvBlock>> {
    let mut parent: Option<BlockHash> = None;
    (0..n)
        .map(|i| {
            let token_ids: Vec<u32> = (0..BLOCK as u32)
                .map(|t| seed * 1000 + i as u32 * 64 + t)
                .collect();
            let hash = BlockHash::chain(parent.as_ref(), &token_ids, FP, "");
            let data: Vec<u8> = (0..4 * BLOCK * 256 * 4)
                .map(|j| (j as u32 ^ seed ^ i as u32) as u8)
                .collect();
            let block = Arc::new(KvBlock {
                meta: BlockMeta {
                    hash,
                    parent,
                    token_ids,
                    model_fingerprint: FP.into(),
                },
                payload: KvPayload {
                    encoding: KvEncoding::Float {
                        dtype: TensorDtype::F32,
                    },
                    tensors: vec![KvTensor {
                        name: "l0.k".into(),
                        dtype: TensorDtype::F32,
                        shape: vec![4, BLOCK, 256],
                        data: data.into(),
                    }],
                },
            });
            parent = Some(hash);
            block
        })
        .collect()
}

fn manifest(agent: &str, blocks: &[Arc<KvBlock>], now: u64) -> AgentManifest {
    AgentManifest {
        version: AgentManifest::VERSION,
        agent: AgentId::new(agent).expect("id"),
        namespace: Namespace::default(),
        model_fingerprint: FP.into(),
        block_tokens: BLOCK as u32,
        token_ids: blocks
            .iter()
            .flat_map(|b| b.meta.token_ids.clone())
            .collect(),
        block_hashes: blocks.iter().map(|b| b.meta.hash.to_string()).collect(),
        created_at_ms: 1,
        last_used_at_ms: now,
        pinned: false,
        ttl_secs: None,
    }
}

fn tier(server: &S3TestServer, dir: &std::path::Path) -> ObjectTierStore {
    let cfg = ObjectTierConfig {
        prefix: PREFIX.into(),
        read_timeout: Duration::from_millis(1000),
        probe_interval: Duration::from_millis(100),
        ..ObjectTierConfig::default()
    };
    let remote = build_s3(&server.settings(), &cfg).expect("client");
    let local = DiskCacheStore::open(DiskStoreConfig::new(dir)).expect("disk");
    ObjectTierStore::open(local, remote, cfg).expect("tier")
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_blocks_through_a_real_s3_server() {
    let Some(bin) = require_server("replicas_share_blocks_through_a_real_s3_server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server =
        S3TestServer::start(&bin, &dir.path().join("s3"), "semantic-kv").expect("s3s-fs");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let a = tier(&server, &a_dir);
    let blocks = chain(4, 1);
    let key = AgentKey {
        namespace: Namespace::default(),
        agent: AgentId::new("agent-a").expect("id"),
    };

    // Replica A: written locally, uploaded in the background as the same bytes.
    a.save_blocks(blocks.clone()).await.expect("save");
    a.save_manifest(&manifest("agent-a", &blocks, 1))
        .await
        .expect("manifest");
    a.flush().await.expect("flush");
    let stats = a.stats().await.expect("stats").remote.expect("remote");
    assert!(stats.up, "{stats:?}");
    assert_eq!((stats.blocks_uploaded, stats.manifests_uploaded), (4, 1));
    for b in &blocks {
        let object = server
            .root()
            .join("semantic-kv")
            .join(PREFIX)
            .join("blocks")
            .join(format!("{}.safetensors", b.meta.hash));
        let uploaded = std::fs::read(&object).expect("the object is on the server's disk");
        let local = a
            .local()
            .block_file_bytes_blocking(&b.meta.hash)
            .expect("read")
            .expect("local");
        assert!(uploaded == local, "object == local file");
    }

    // Replica B: restores A's blocks and manifest from the bucket, verified and equal.
    let b = tier(&server, &b_dir);
    let hashes: Vec<BlockHash> = blocks.iter().map(|b| b.meta.hash).collect();
    assert_eq!(b.stored_prefix(&hashes).await.expect("prefix"), 4);
    let start = Instant::now();
    let restored = b.load_blocks(FP, &hashes).await.expect("load");
    let took = start.elapsed();
    assert_eq!(restored.len(), 4);
    for (r, w) in restored.iter().zip(&blocks) {
        assert!(r.as_ref() == w.as_ref(), "restored == written");
    }
    let bytes = b
        .stats()
        .await
        .expect("stats")
        .remote
        .expect("remote")
        .bytes_downloaded;
    eprintln!("restored 4 blocks ({bytes} B) from s3s-fs in {took:?}");
    let m = b
        .load_manifest(&key)
        .await
        .expect("load")
        .expect("manifest from the bucket");
    assert_eq!(m.last_used_at_ms, 1);

    // B takes the agent's next turn; A's stale turn does not overwrite it.
    b.save_manifest(&manifest("agent-a", &blocks, 2))
        .await
        .expect("save");
    b.flush().await.expect("flush");
    a.save_manifest(&manifest("agent-a", &blocks[..1], 3))
        .await
        .expect("save");
    a.flush().await.expect("flush");
    assert_eq!(
        a.stats()
            .await
            .expect("stats")
            .remote
            .expect("remote")
            .stale_manifests,
        1
    );
    let fresh = tier(&server, &dir.path().join("c"));
    assert_eq!(
        fresh
            .load_manifest(&key)
            .await
            .expect("load")
            .map(|m| m.last_used_at_ms),
        Some(2)
    );

    // The store goes down: B keeps working from its disk, then catches up.
    server.stop();
    let more = chain(2, 2);
    b.save_blocks(more.clone()).await.expect("save while down");
    b.save_manifest(&manifest("agent-a", &more, 4))
        .await
        .expect("manifest while down");
    assert_eq!(
        b.load_manifest(&key)
            .await
            .expect("load")
            .map(|m| m.last_used_at_ms),
        Some(4)
    );
    let stats_now = || {
        futures::executor::block_on(b.stats())
            .expect("stats")
            .remote
            .expect("remote")
    };
    wait("the outage to be noticed", || !stats_now().up);
    assert_eq!(stats_now().outages, 1);
    server.resume().expect("restart s3s-fs");
    wait("the upload queue to drain", || {
        let s = stats_now();
        s.up && s.upload_queue == 0
    });
    let c = tier(&server, &dir.path().join("d"));
    let more_hashes: Vec<BlockHash> = more.iter().map(|b| b.meta.hash).collect();
    assert_eq!(
        c.load_blocks(FP, &more_hashes).await.expect("load").len(),
        2
    );
    assert_eq!(
        c.load_manifest(&key)
            .await
            .expect("load")
            .map(|m| m.last_used_at_ms),
        Some(4)
    );
}
