//! What config says a request may do, as pure rules without I/O: route matching and filters,
//! load balancing, retries and budgets, rate limits and faults, health and outlier ejection,
//! authorization, JWT checks.

pub mod authz;
pub mod balance;
pub mod grpc_route;
pub mod health;
pub mod jwt;
pub mod limit;
pub mod listener;
pub mod retry;
pub mod route;
