//! Fixed pool of KV blocks: allocation, owners, reference counts, content hashes, LRU (pure domain).
