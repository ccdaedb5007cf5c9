//! The variadic exec functions are a few lines of C (see c/execl.c).
fn main() {
    println!("cargo:rerun-if-changed=c/execl.c");
    cc::Build::new().file("c/execl.c").flag("-fvisibility=default").compile("vos_execl");
}
