//! End-to-end tests: two proxies on loopback with mTLS between them, real
//! servers behind them. One test binary; each test builds its own mesh.

mod support;

mod policy;
mod robustness;
mod routing;
mod traffic;
mod upgrade;
