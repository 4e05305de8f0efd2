//! HTTP adapter: OpenAI and Anthropic APIs, agents admin, health and metrics (axum).
