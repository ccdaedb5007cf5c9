pub mod client;
pub mod launch;
pub mod members;
pub mod ns;
pub mod registry;
pub mod supervisor;
