//! `resync VOL...` (LVM, and image files tracked by reflink copies): compare tick with the archive's latest
//! session, as dom0's manifests describe it, and mark every chunk that
//! differs in the delta map, so the next send brings the archive back in
//! line (after a lost delta map, or a volume reverted to older content).

use super::Ctx;
use crate::changes::{Candidates, ScanJobs, TrackedVolume};
use crate::chunk;
use crate::chunk::pipeline;
use crate::meta::MetaDir;
use crate::source::ImageVolume;
use anyhow::{bail, Result};

pub fn run(ctx: &Ctx) -> Result<()> {
    let names = ctx.config.select_volumes(&ctx.cli.volumes, true)?;
    let meta = MetaDir::lock(&ctx.config.meta_dir)?;
    let tracking = ctx.tracking()?;
    let keys = ctx.keys(&meta)?;
    for name in &names {
        let vm = meta.volume(&ctx.pool_dir, name);
        let sessions = vm.sessions()?;
        let Some(latest) = sessions.last() else {
            bail!("{name} has never been sent; nothing to resync");
        };
        let cs = vm.info(latest)?.chunk_size;
        let tracked = TrackedVolume::new(tracking.require("resync", name)?, name, vm.deltamap_path());
        let mut tick = ImageVolume::open(&tracked.tick_path()?)?;
        let mut map = tracked.map_for_resync(cs, tick.size())?;
        let before = map.count_marked();
        let jobs = ScanJobs::new(&mut tick, vm.merged(&sessions)?, Candidates::AllData, cs, false);
        let volume = ctx.volume_ref(name);
        let codec = chunk::ChunkCodec { keys: keys.as_ref(), volume: &volume };
        let work = |job: chunk::ChunkJob| Ok((job.addr, chunk::differs(job, &codec)));
        pipeline::ordered_map(jobs, pipeline::Lanes::for_chunks(cs), work, |(addr, differs)| {
            if differs {
                map.mark(addr / cs)?;
            }
            Ok(())
        })?;
        tracked.save_map(&map)?;
        log::info!(
            "{name}: {} chunks differ from session {}; {} marked for the next send",
            map.count_marked() - before,
            latest.date_time(),
            map.count_marked()
        );
    }
    Ok(())
}
