//! Link the restorer as a static, freestanding executable at a fixed address inside the window the shim keeps
//! free in every job (vos::plan::WINDOW_START; kept in sync by a test).
fn main() {
    for a in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--image-base=0x200000000000",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={a}");
    }
}
