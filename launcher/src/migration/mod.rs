pub mod address;
pub mod channel;
pub mod fill;
pub mod migrate;
pub mod precopy;
pub mod serve;
