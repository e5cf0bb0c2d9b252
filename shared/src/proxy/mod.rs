//! The data plane: the compiled snapshot a request reads ([`table`]), the process's long-lived
//! inputs ([`mesh`]), a request's call to a service ([`call`], one [`attempt`] per try, through
//! [`pick`], [`local`] or [`remote`]), and the pipeline both proxies run ([`pipeline`]).

mod attempt;
pub mod backend_tls;
pub mod call;
pub mod drain;
pub mod ext_authz;
pub mod jwt;
pub mod local;
pub mod mesh;
pub mod mirror;
mod patch;
pub mod pick;
pub mod pipeline;
mod remote;
pub mod table;
pub mod tcp;
mod tunnel;
pub mod upgrade;
