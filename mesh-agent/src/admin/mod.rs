//! The admin API on port 15020.

pub mod api;
