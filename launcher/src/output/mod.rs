//! What vrun prints: text a job controls made safe for a terminal, progress bars, times.

pub mod escape;
pub mod progress;
pub mod time;
