//! Every kind of kernel object a job holds, one module each, captured at checkpoint and made again at restore.
//! (The convention they follow is described below; the flows in `checkpoint.rs` and `restore/` call them in order.)

pub mod bundle;
pub mod creds;
pub mod events;
pub mod files;
pub mod host;
pub mod identity;
pub mod inet;
pub mod pathopen;
pub mod sockets;
pub mod sysv;
pub mod terminal;
pub mod vdso;
