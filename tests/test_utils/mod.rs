//! Shared support code for the integration tests and the benchmarks
//! (`mod test_utils;`). Servers bind `127.0.0.1:0` and run on the current
//! tokio runtime; every delay is tokio's, so they also work under a paused
//! clock.

#![allow(dead_code)]

mod client;
mod doubles;
mod load;
mod probe;
mod retire;
mod rotating;
mod scale_up;
mod server;
mod trivial;

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use doubles::*;
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use probe::*;
#[allow(unused_imports)]
pub use retire::*;
#[allow(unused_imports)]
pub use rotating::*;
#[allow(unused_imports)]
pub use scale_up::*;
#[allow(unused_imports)]
pub use server::*;
#[allow(unused_imports)]
pub use trivial::*;

/// Boxed error used by the helpers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
