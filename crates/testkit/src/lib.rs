//! In-memory fakes of every port of agent-session, for tests and embedding.
