//! vrun: run a program under vOS, checkpoint it, restore it, inspect its images. See ARCHITECTURE.md for the map.

mod checkpoint;
mod cli;
mod image;
mod job;
mod migration;
mod os;
mod output;
mod resources;
mod restore;
mod supervise;

fn main() {
    cli::main()
}
