//! Cache store adapter: KV blocks and agent manifests on disk, verified on read.
