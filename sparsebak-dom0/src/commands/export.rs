//! `export VOL [--session DT] --socket PATH [--once]`: serves a session
//! read-only over NBD on a Unix socket (mode 0600), one client at a time,
//! until SIGINT/SIGTERM (or, with `--once`, until the first client
//! disconnects). The socket file is removed on exit.
//!
//! dom0's metadata lock is held only while the session's chunk index is
//! built: timer sends go on while the export runs. A prune of the exported
//! session meanwhile makes reads of its moved chunks fail (EIO, as for any
//! chunk the receiver cannot give); nothing wrong is ever served.

use super::{Ctx, ReadChain};
use crate::export::{nbd, SessionImage};
use crate::interrupt;
use crate::meta::MetaDir;
use crate::remote::Receiver;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

pub fn run(ctx: &Ctx) -> Result<()> {
    let [name] = ctx.cli.volumes.as_slice() else {
        bail!("export takes exactly one volume");
    };
    ctx.config.validate_volume(name)?;
    let socket = ctx.cli.socket.as_deref().context("export needs --socket PATH")?;
    // Before any thread starts (see `interrupt`): a signal removes the socket.
    let guard = interrupt::watch()?;
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let vm = meta.volume(&ctx.pool_dir, name);
    if !vm.exists() {
        bail!("volume {name:?} has no sessions in {}", ctx.config.meta_dir.display());
    }
    let keys = ctx.keys(&meta)?;
    let volume = ctx.volume_ref(name);
    let mut rx = Receiver::connect(&ctx.config)?;
    let ReadChain { upto, .. } = ctx.read_chain(name, &vm, &mut rx, keys.as_ref(), &volume)?;
    let session = upto.last().context("no session")?.clone();
    let info = vm.info(&session)?;
    let mut image = SessionImage::new(name, &vm, volume, keys.as_ref(), upto, info.volume_size, info.chunk_size, rx)?;
    drop(meta);

    let listener = listen(socket)?;
    guard.set(socket.to_path_buf());
    log::info!(
        "serving {name} session {} ({} bytes, read-only) at nbd+unix:///{name}?socket={}",
        session.date_time(),
        info.volume_size,
        socket.display()
    );
    let served = serve_clients(&listener, &mut image, ctx.cli.once);
    guard.clear();
    let removed = std::fs::remove_file(socket).with_context(|| format!("removing {}", socket.display()));
    served.and(removed).and(image.finish())
}

/// Accepts clients one after the other.
fn serve_clients(listener: &UnixListener, image: &mut SessionImage, once: bool) -> Result<()> {
    loop {
        let (mut stream, _) = listener.accept().context("accepting an NBD client")?;
        match nbd::serve(&mut stream, image) {
            Ok(nbd::End::Disconnected) => log::info!("NBD client disconnected"),
            Err(e) => log::warn!("NBD client dropped: {e}"),
        }
        if once {
            return Ok(());
        }
    }
}

/// Binds the socket with mode 0600 (no moment where others could connect).
/// A socket left by a killed export is replaced; any other file there is
/// refused, a link never followed.
fn listen(path: &Path) -> Result<UnixListener> {
    sparsebak_fsutil::remove_stale(path, FileTypeExt::is_socket, "a socket")?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound.with_context(|| format!("listening on {}", path.display()))
}
