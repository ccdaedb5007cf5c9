//! A few lines of C: the variadic exec functions (c/execl.c) and the shim's thread-local word (c/tls.c).
fn main() {
    println!("cargo:rerun-if-changed=c/execl.c");
    println!("cargo:rerun-if-changed=c/tls.c");
    cc::Build::new().file("c/execl.c").flag("-fvisibility=default").compile("vos_execl");
    cc::Build::new().file("c/tls.c").flag("-fvisibility=hidden").compile("vos_tls");
}
