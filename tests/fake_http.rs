//! Placeholder until the fake HTTP end-to-end test lands.
