#![forbid(unsafe_code)]
mod lvm;
fn main() {}
