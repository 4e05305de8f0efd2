//! Application core: agents, sessions, prefix matching, the cache coordinator and the ports (pure domain).
