//! Inference engine adapter on MLX through mlx-rs.
