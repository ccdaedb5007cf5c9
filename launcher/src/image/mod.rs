pub mod file;
pub mod inspect;
pub mod sign;
