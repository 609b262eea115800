//! A blocking view of one S3 bucket, with the concurrency a store with
//! latency needs (uploads in the background, reads and copies in batches).
//!
//! Built on Apache Arrow's `object_store` (its S3 client): a well-kept,
//! widely used crate with SigV4, retries with backoff, multipart uploads,
//! server-side copy and create-only puts (`If-None-Match: *`), behind one
//! trait that also has an in-memory and a local implementation. `rust-s3`
//! lacks create-only puts; `opendal` brings far more than this needs. It is
//! async: the receiver runs a small tokio runtime of its own and blocks on
//! it, so the protocol stays synchronous.
//!
//! Every request is bounded by the profile's `timeout` and `retries`, so a
//! stalled object store becomes an error, never a hang. Errors are turned
//! into one line that names the bucket and, where it helps, what to fix.

use super::profile::Profile;
use anyhow::{anyhow, bail, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Bytes of chunk uploads in flight at most (each holds its data).
const UPLOAD_BYTES_IN_FLIGHT: usize = 24 << 20;
/// Requests run at once by the batch operations.
const CONCURRENCY: usize = 16;
/// Objects up to this size are uploaded with one request, larger ones in
/// parts of this size (S3 wants at least 5 MiB per part).
const PART: usize = 8 << 20;

pub struct Bucket {
    rt: tokio::runtime::Runtime,
    store: Arc<AmazonS3>,
    /// `s3://BUCKET` at its endpoint, for messages.
    name: String,
    /// The settings file, for hints.
    settings: String,
    uploads: JoinSet<Result<usize>>,
    upload_bytes: usize,
}

impl Bucket {
    pub fn open(p: &Profile) -> Result<Bucket> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3 client")
            .enable_all()
            .build()
            .map_err(|e| anyhow!("starting the S3 client's runtime: {e}"))?;
        let client = ClientOptions::new()
            .with_timeout(p.timeout)
            .with_connect_timeout(p.timeout.min(Duration::from_secs(10)))
            .with_allow_http(true);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: p.retries,
            retry_timeout: p.timeout,
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&p.bucket)
            .with_region(&p.region)
            .with_access_key_id(&p.access_key)
            .with_secret_access_key(&p.secret_key)
            .with_virtual_hosted_style_request(!p.path_style)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(e) = &p.endpoint {
            b = b.with_endpoint(e);
        }
        let at = p.endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
        let name = format!("s3://{}{at}", p.bucket);
        let store = b.build().map_err(|e| anyhow!("{name}: {}", one_line(&e.to_string())))?;
        Ok(Bucket {
            rt,
            store: Arc::new(store),
            name,
            settings: format!("{} [{}]", p.file.display(), p.bucket),
            uploads: JoinSet::new(),
            upload_bytes: 0,
        })
    }

    /// Turns an object store error into one line naming the bucket.
    fn fail(&self, what: &str, e: object_store::Error) -> anyhow::Error {
        describe(&self.name, &self.settings, what, &e)
    }

    /// Stores `data` at `key` unless something is there: `Ok(false)` then.
    pub fn put_create(&self, key: &Path, data: Vec<u8>) -> Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.rt.block_on(self.store.put_opts(key, PutPayload::from(data), opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.fail(&format!("creating {key}"), e)),
        }
    }

    pub fn put(&self, key: &Path, data: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.store.put(key, PutPayload::from(data)))
            .map_err(|e| self.fail(&format!("writing {key}"), e))?;
        Ok(())
    }

    /// Uploads a file of `len` bytes from its start.
    pub fn put_file(&self, key: &Path, mut file: std::fs::File, len: u64) -> Result<()> {
        let mut upload = StreamingUpload::new(key.clone());
        let mut left = len;
        while left > 0 {
            let mut piece = Vec::with_capacity(PART);
            let n = file.by_ref().take(left.min(PART as u64)).read_to_end(&mut piece);
            let n = n.map_err(|e| anyhow!("reading spooled {key}: {e}"))?;
            if n == 0 {
                break;
            }
            left -= n as u64;
            self.stream_write(&mut upload, &piece)?;
        }
        self.stream_finish(upload)
    }

    /// Appends to an object being written: held in memory up to [`PART`]
    /// bytes, then sent as parts of a multipart upload as it grows.
    pub fn stream_write(&self, up: &mut StreamingUpload, data: &[u8]) -> Result<()> {
        up.buf.extend_from_slice(data);
        while up.buf.len() >= PART {
            let rest = up.buf.split_off(PART);
            let part = std::mem::replace(&mut up.buf, rest);
            self.put_part(up, part)?;
        }
        Ok(())
    }

    fn put_part(&self, up: &mut StreamingUpload, part: Vec<u8>) -> Result<()> {
        let what = format!("writing {}", up.key);
        if up.upload.is_none() {
            up.upload = Some(self.rt.block_on(self.store.put_multipart(&up.key)).map_err(|e| self.fail(&what, e))?);
        }
        let Some(upload) = up.upload.as_mut() else { bail!("{what}: no upload") };
        if let Err(e) = self.rt.block_on(upload.put_part(PutPayload::from(part))) {
            self.stream_abort(up);
            return Err(self.fail(&what, e));
        }
        Ok(())
    }

    /// Completes the object: one request if it stayed small.
    pub fn stream_finish(&self, mut up: StreamingUpload) -> Result<()> {
        if up.upload.is_none() {
            return self.put(&up.key, std::mem::take(&mut up.buf));
        }
        if !up.buf.is_empty() {
            let last = std::mem::take(&mut up.buf);
            self.put_part(&mut up, last)?;
        }
        let what = format!("writing {}", up.key);
        let Some(upload) = up.upload.as_mut() else { bail!("{what}: no upload") };
        if let Err(e) = self.rt.block_on(upload.complete()) {
            self.stream_abort(&mut up);
            return Err(self.fail(&what, e));
        }
        Ok(())
    }

    /// Abandons an object being written (best effort: the parts of a
    /// multipart upload are freed on the server).
    pub fn stream_abort(&self, up: &mut StreamingUpload) {
        if let Some(mut upload) = up.upload.take() {
            let _ = self.rt.block_on(upload.abort());
        }
        up.buf = Vec::new();
    }

    /// Starts uploading `data` to `key` in the background; waits first if
    /// too many uploads or bytes are on their way (each upload holds its
    /// data, a connection and a task until it is reaped here). Errors of
    /// earlier uploads surface here or in [`Bucket::wait_uploads`].
    pub fn spawn_put(&mut self, key: Path, data: Vec<u8>) -> Result<()> {
        let len = data.len();
        while (self.uploads.len() >= CONCURRENCY || self.upload_bytes + len > UPLOAD_BYTES_IN_FLIGHT)
            && !self.uploads.is_empty()
        {
            self.wait_one()?;
        }
        let store = Arc::clone(&self.store);
        let (name, settings) = (self.name.clone(), self.settings.clone());
        self.upload_bytes += len;
        self.uploads.spawn_on(
            async move {
                match store.put(&key, PutPayload::from(data)).await {
                    Ok(_) => Ok(len),
                    Err(e) => Err(describe(&name, &settings, &format!("writing {key}"), &e)),
                }
            },
            self.rt.handle(),
        );
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        match self.rt.block_on(self.uploads.join_next()) {
            Some(Ok(Ok(len))) => {
                self.upload_bytes -= len;
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow!("an upload task failed: {e}")),
            None => Ok(()),
        }
    }

    /// Waits until every background upload is done; the first error.
    pub fn wait_uploads(&mut self) -> Result<()> {
        let mut first = None;
        while !self.uploads.is_empty() {
            if let Err(e) = self.wait_one() {
                first.get_or_insert(e);
            }
        }
        self.upload_bytes = 0;
        first.map_or(Ok(()), Err)
    }

    /// Drops background uploads without waiting for them.
    pub fn cancel_uploads(&mut self) {
        self.uploads.abort_all();
        self.rt.block_on(async { while self.uploads.join_next().await.is_some() {} });
        self.upload_bytes = 0;
    }

    /// The whole object at `key`, `None` if there is none; refuses one
    /// larger than `max` bytes before reading it.
    pub fn get(&self, key: &Path, max: u64) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(get_bounded(&self.store, key, max)).map_err(|e| match e {
            Fetch::Store(e) => self.fail(&format!("reading {key}"), e),
            Fetch::TooLarge(n) => anyhow!("{}: {key} is {n} bytes, more than {max}", self.name),
        })
    }

    /// [`Bucket::get`] of many objects at once, in order; a missing object
    /// is an error of its own.
    pub fn get_many(&self, keys: Vec<Path>, max: u64) -> Vec<Result<Vec<u8>>> {
        let store = &self.store;
        let fetches = futures::stream::iter(keys.into_iter().map(|key| async move {
            let got = get_bounded(store, &key, max).await;
            (key, got)
        }))
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>();
        self.rt
            .block_on(fetches)
            .into_iter()
            .map(|(key, got)| match got {
                Ok(Some(data)) => Ok(data),
                Ok(None) => bail!("{}: {key} is missing", self.name),
                Err(Fetch::Store(e)) => Err(self.fail(&format!("reading {key}"), e)),
                Err(Fetch::TooLarge(n)) => bail!("{}: {key} is {n} bytes, more than {max}", self.name),
            })
            .collect()
    }

    /// Calls `f` with every line of the object at `key` (nothing if there is
    /// none), streaming it: lines longer than `max_line` bytes are an error.
    pub fn for_each_line(&self, key: &Path, max_line: usize, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let what = format!("reading {key}");
        let got = match self.rt.block_on(self.store.get(key)) {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(self.fail(&what, e)),
        };
        let mut stream = got.into_stream();
        let mut line = Vec::with_capacity(max_line);
        loop {
            let piece = match self.rt.block_on(stream.next()) {
                None => break,
                Some(Ok(piece)) => piece,
                Some(Err(e)) => return Err(self.fail(&what, e)),
            };
            for &b in piece.iter() {
                if b == b'\n' {
                    f(&line)?;
                    line.clear();
                } else if line.len() >= max_line {
                    bail!("{}: {key} has a line longer than {max_line} bytes", self.name);
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            f(&line)?;
        }
        Ok(())
    }

    /// Up to `max` bytes of `key` from `offset` (empty at or past its end).
    pub fn get_range(&self, key: &Path, offset: u64, max: usize) -> Result<Vec<u8>> {
        let what = format!("reading {key}");
        let size = self.rt.block_on(self.store.head(key)).map_err(|e| self.fail(&what, e))?.size;
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = size.min(offset + max as u64);
        let opts = GetOptions { range: Some(GetRange::Bounded(offset..end)), ..Default::default() };
        let bytes = self
            .rt
            .block_on(async { self.store.get_opts(key, opts).await?.bytes().await })
            .map_err(|e| self.fail(&what, e))?;
        Ok(bytes.to_vec())
    }

    pub fn exists(&self, key: &Path) -> Result<bool> {
        match self.rt.block_on(self.store.head(key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(&format!("looking up {key}"), e)),
        }
    }

    /// Removes `key`; fine when it is not there.
    pub fn delete(&self, key: &Path) -> Result<()> {
        match self.rt.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(&format!("removing {key}"), e)),
        }
    }

    /// Removes many objects at once (fine when some are not there).
    pub fn delete_many(&self, keys: Vec<Path>) -> Result<()> {
        let what = "removing objects";
        let deleted = self.store.delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
        let done = deleted
            .filter(|r| std::future::ready(!matches!(r, Err(object_store::Error::NotFound { .. }))))
            .try_collect::<Vec<_>>();
        self.rt.block_on(done).map_err(|e| self.fail(what, e))?;
        Ok(())
    }

    /// Removes every object under `prefix/`, a page at a time.
    pub fn delete_under(&self, prefix: &Path) -> Result<()> {
        let mut page = Vec::new();
        self.for_each_object(prefix, |key, _| {
            page.push(key.clone());
            if page.len() >= 1000 {
                self.delete_many(std::mem::take(&mut page))?;
            }
            Ok(())
        })?;
        self.delete_many(page)
    }

    /// What is directly under `prefix/`.
    pub fn list_dir(&self, prefix: &Path) -> Result<Listing> {
        let listed = self
            .rt
            .block_on(self.store.list_with_delimiter(Some(prefix)))
            .map_err(|e| self.fail(&format!("listing {prefix}/"), e))?;
        let last = |p: &Path| p.filename().map(str::to_string).unwrap_or_default();
        let dirs = listed.common_prefixes.iter().map(last).collect();
        let objects = listed.objects.iter().map(|o| last(&o.location)).collect();
        Ok(Listing { dirs, objects })
    }

    /// Calls `f` with every object under `prefix/` (recursively) and its
    /// size, in key order, one page in memory at a time.
    pub fn for_each_object(&self, prefix: &Path, mut f: impl FnMut(&Path, u64) -> Result<()>) -> Result<()> {
        let mut listing = self.store.list(Some(prefix));
        loop {
            match self.rt.block_on(listing.next()) {
                None => return Ok(()),
                Some(Ok(meta)) => f(&meta.location, meta.size)?,
                Some(Err(e)) => return Err(self.fail(&format!("listing {prefix}/"), e)),
            }
        }
    }

    /// Server-side copies, many at once: no data passes through here.
    pub fn copy_many(&self, pairs: Vec<(Path, Path)>) -> Result<()> {
        let store = &self.store;
        let copies = futures::stream::iter(
            pairs.into_iter().map(|(from, to)| async move { store.copy(&from, &to).await.map_err(|e| (from, e)) }),
        )
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>();
        self.rt.block_on(copies).map_err(|(from, e)| self.fail(&format!("copying {from}"), e))?;
        Ok(())
    }
}

/// An object written piece by piece (see [`Bucket::stream_write`]).
pub struct StreamingUpload {
    key: Path,
    buf: Vec<u8>,
    upload: Option<Box<dyn object_store::MultipartUpload>>,
}

impl StreamingUpload {
    pub fn new(key: Path) -> StreamingUpload {
        StreamingUpload { key, buf: Vec::new(), upload: None }
    }
}

/// The sub-folders and objects directly under a prefix, by last segment.
pub struct Listing {
    pub dirs: Vec<String>,
    pub objects: Vec<String>,
}

enum Fetch {
    Store(object_store::Error),
    TooLarge(u64),
}

async fn get_bounded(store: &AmazonS3, key: &Path, max: u64) -> Result<Option<Vec<u8>>, Fetch> {
    let got = match store.get(key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Fetch::Store(e)),
    };
    if got.meta.size > max {
        return Err(Fetch::TooLarge(got.meta.size));
    }
    let bytes = got.bytes().await.map_err(Fetch::Store)?;
    if bytes.len() as u64 > max {
        return Err(Fetch::TooLarge(bytes.len() as u64));
    }
    Ok(Some(Vec::from(bytes)))
}

/// One line for an object store error: the S3 error code when the server
/// sent one, and advice for the usual causes.
fn describe(bucket: &str, settings: &str, what: &str, e: &object_store::Error) -> anyhow::Error {
    let text = one_line(&format!("{e}"));
    let code = text.split("<Code>").nth(1).and_then(|r| r.split("</Code>").next()).unwrap_or("");
    let lower = text.to_ascii_lowercase();
    let advice = match code {
        "SignatureDoesNotMatch" | "InvalidAccessKeyId" | "AccessDenied" => {
            format!("the object store refused the credentials ({code}): check access_key and secret_key in {settings}")
        }
        "NoSuchBucket" => "the bucket does not exist: create it, or fix the bucket in dom0's desturl".to_string(),
        _ if matches!(
            e,
            object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. }
        ) =>
        {
            format!("access denied: check the credentials in {settings}")
        }
        _ if lower.contains("connection refused")
            || lower.contains("error sending request")
            || lower.contains("timed out") =>
        {
            format!("cannot reach the object store (is it running? is endpoint in {settings} right?)")
        }
        _ => String::new(),
    };
    let detail: String = text.chars().take(300).collect();
    if advice.is_empty() {
        anyhow!("{bucket}: {what}: {detail}")
    } else {
        anyhow!("{bucket}: {what}: {advice} [{detail}]")
    }
}

/// Collapses whitespace (S3 errors carry XML bodies over many lines).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
