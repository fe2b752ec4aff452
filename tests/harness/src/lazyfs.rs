//! A FUSE filesystem that holds file data until it is fsynced, and can lose what was not (S9).
//!
//! kill -9 alone cannot prove that a broker fsyncs before it acknowledges: the kernel's page cache keeps
//! every write of a killed process. This filesystem models the machine losing power instead. It passes
//! every call through to a backing directory, except file data: a write lands in dirty pages held here,
//! reads see those pages over the backing file, and only `fsync` (or `fdatasync`) writes them to the
//! backing file and syncs it. [`LazyMount::lose_unfsynced`], called after the node is killed, drops every
//! dirty page, so the node restarts with exactly what it had fsynced, as Jepsen's lazyfs `clear-cache` does.
//!
//! Metadata (create, rename, unlink, truncate, mkdir) goes to the backing directory at once, as with
//! lazyfs: a file created and written but never fsynced survives the loss, empty or short.
//!
//! Files are opened with direct I/O, so the kernel keeps no page cache of its own over them, and entries
//! and attributes are never cached: after a loss, the restarted node sees sizes and data as they are here.
//! The session is single-threaded. A killed process's requests are either answered before it finishes
//! exiting or dropped by the kernel unsent, so once the process is reaped none of its writes can land
//! after the loss.
//!
//! The mount also plays a failing or slow disk (S14, as Redpanda's `ruinio` and `slowio`):
//! [`LazyMount::set_faults`] makes every read, write and fsync (of files and directories) fail with EIO,
//! or wait a while first.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::OFlags;

const PAGE: u64 = 4096;
/// Nothing is cached in the kernel: sizes change under it when unfsynced data is lost.
const TTL: Duration = Duration::ZERO;

/// What one loss dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The files that had data not yet fsynced (names only; empty for unlinked files), by name.
    pub files: Vec<String>,
    /// Dirty bytes dropped (whole pages).
    pub bytes: u64,
}

struct Inode {
    /// Path relative to the backing directory; stale once the file is unlinked.
    path: PathBuf,
    /// Dirty pages by page index, each `PAGE` bytes.
    dirty: BTreeMap<u64, Vec<u8>>,
    /// The file's size as writes since the last fsync left it; `None` when it is the backing file's.
    size: Option<u64>,
}

struct Handle {
    /// The backing file (read-write for files; `None` for directories).
    file: Option<File>,
}

/// How the disk under a mount misbehaves; the default is a healthy disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskFaults {
    /// Every read, write and fsync fails with EIO.
    pub fail: bool,
    /// Every read, write and fsync waits this long first (the session is single-threaded, so every
    /// request queued behind it waits too, as on a saturated device).
    pub delay: Duration,
}

struct State {
    backing: PathBuf,
    faults: DiskFaults,
    inodes: HashMap<u64, Inode>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn attr_of(ino: u64, meta: &std::fs::Metadata, size: u64) -> FileAttr {
    let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (meta.mode() & 0o7777) as u16,
        nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: u32::try_from(meta.rdev()).unwrap_or(0),
        blksize: PAGE as u32,
        flags: 0,
    }
}

impl State {
    fn inode(&self, ino: INodeNo) -> Result<&Inode, Errno> {
        self.inodes.get(&ino.0).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: INodeNo) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn full_path(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    /// The inode number of `rel`, allocated on first sight.
    fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(rel) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_path.insert(rel.to_path_buf(), ino);
        self.inodes.insert(ino, Inode { path: rel.to_path_buf(), dirty: BTreeMap::new(), size: None });
        ino
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.inode(parent)?.path.join(name))
    }

    /// The backing file's metadata: through an open handle if there is one (the file may be unlinked).
    fn metadata(&self, ino: u64, fh: Option<FileHandle>) -> Result<std::fs::Metadata, Errno> {
        if let Some(file) = fh.and_then(|fh| self.handles.get(&fh.0)).and_then(|h| h.file.as_ref()) {
            return file.metadata().map_err(errno);
        }
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        std::fs::symlink_metadata(self.full_path(&inode.path)).map_err(errno)
    }

    fn attr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let meta = self.metadata(ino, fh)?;
        let size = self.inodes.get(&ino).and_then(|i| i.size).unwrap_or(meta.len());
        Ok(attr_of(ino, &meta, size))
    }

    fn entry(&mut self, rel: &Path) -> Result<FileAttr, Errno> {
        std::fs::symlink_metadata(self.full_path(rel)).map_err(errno)?;
        let ino = self.ino_of(rel);
        self.attr(ino, None)
    }

    fn open_handle(&mut self, file: Option<File>) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { file });
        fh
    }

    fn file(&self, fh: FileHandle) -> Result<&File, Errno> {
        self.handles.get(&fh.0).and_then(|h| h.file.as_ref()).ok_or(Errno::EBADF)
    }

    /// The current size of an open file: its dirty size, or the backing file's.
    fn size(&self, ino: u64, fh: FileHandle) -> Result<u64, Errno> {
        if let Some(size) = self.inodes.get(&ino).and_then(|i| i.size) {
            return Ok(size);
        }
        Ok(self.file(fh)?.metadata().map_err(errno)?.len())
    }

    fn read(&self, ino: u64, fh: FileHandle, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        let size = self.size(ino, fh)?;
        let end = size.min(offset.saturating_add(u64::from(len)));
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let file = self.file(fh)?;
        let mut done = 0;
        while done < out.len() {
            match file.read_at(&mut out[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        for (&page, data) in inode.dirty.range(offset / PAGE..end.div_ceil(PAGE)) {
            let start = page * PAGE;
            let from = start.max(offset);
            let to = (start + PAGE).min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(out)
    }

    fn write(&mut self, ino: u64, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        let backing_len = self.file(fh)?.metadata().map_err(errno)?.len();
        let size = self.inodes.get(&ino).ok_or(Errno::ENOENT)?.size.unwrap_or(backing_len);
        let mut fresh = Vec::new();
        {
            let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
            for page in offset / PAGE..end.div_ceil(PAGE) {
                if !inode.dirty.contains_key(&page) {
                    fresh.push(page);
                }
            }
        }
        // A page written for the first time starts as the backing file's bytes (zeros past its end).
        let mut loaded = Vec::with_capacity(fresh.len());
        for page in fresh {
            let mut buf = vec![0u8; PAGE as usize];
            let start = page * PAGE;
            if start < backing_len {
                let want = (backing_len - start).min(PAGE) as usize;
                self.file(fh)?.read_exact_at(&mut buf[..want], start).map_err(errno)?;
            }
            loaded.push((page, buf));
        }
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        inode.dirty.extend(loaded);
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = rest.len().min(PAGE as usize - within);
            let buf = inode.dirty.get_mut(&page).ok_or(Errno::EIO)?;
            buf[within..within + n].copy_from_slice(&rest[..n]);
            at += n as u64;
            rest = &rest[n..];
        }
        inode.size = Some(size.max(end));
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    /// Writes the inode's dirty pages and size to the backing file and syncs it.
    fn sync(&mut self, ino: u64, fh: FileHandle) -> Result<(), Errno> {
        let size = self.size(ino, fh)?;
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let file = self.file(fh)?;
        for (&page, data) in &inode.dirty {
            let start = page * PAGE;
            if start >= size {
                break;
            }
            let len = (size - start).min(PAGE) as usize;
            file.write_all_at(&data[..len], start).map_err(errno)?;
        }
        if inode.size.is_some() {
            file.set_len(size).map_err(errno)?;
        }
        file.sync_all().map_err(errno)?;
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        inode.dirty.clear();
        inode.size = None;
        Ok(())
    }

    /// Sets the size at once (truncate is metadata here, as in lazyfs), dropping dirty pages past it.
    fn truncate(&mut self, ino: u64, fh: Option<FileHandle>, size: u64) -> Result<(), Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let path = self.full_path(&inode.path);
        match fh.and_then(|fh| self.handles.get(&fh.0)).and_then(|h| h.file.as_ref()) {
            Some(file) => file.set_len(size).map_err(errno)?,
            None => OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(size)).map_err(errno)?,
        }
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        inode.dirty.retain(|&page, _| page * PAGE < size);
        if let Some(buf) = inode.dirty.get_mut(&(size / PAGE)) {
            buf[(size % PAGE) as usize..].fill(0);
        }
        // The backing file now has this size; dirty pages below it still wait for an fsync.
        inode.size = None;
        Ok(())
    }

    /// Moves `from` to `to` in the path table, with everything under it.
    fn renamed(&mut self, from: &Path, to: &Path) {
        if let Some(old) = self.by_path.remove(to) {
            // The replaced file lives on only through handles still open on it.
            if let Some(inode) = self.inodes.get_mut(&old) {
                inode.path = PathBuf::new();
            }
        }
        let moved: Vec<(PathBuf, u64)> =
            self.by_path.iter().filter(|(p, _)| p.starts_with(from)).map(|(p, &i)| (p.clone(), i)).collect();
        for (path, ino) in moved {
            self.by_path.remove(&path);
            let new = match path.strip_prefix(from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }

    fn setattr(
        &mut self,
        ino: INodeNo,
        mode: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        size: Option<u64>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let path = self.full_path(&self.inode(ino)?.path);
        if let Some(mode) = mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(errno)?;
        }
        if owner.0.is_some() || owner.1.is_some() {
            std::os::unix::fs::chown(&path, owner.0, owner.1).map_err(errno)?;
        }
        if let Some(size) = size {
            self.truncate(ino.0, fh, size)?;
        }
        // Times are not kept: the brokers never set them.
        self.attr(ino.0, fh)
    }

    fn mkdir(&mut self, parent: INodeNo, name: &OsStr, mode: u32) -> Result<FileAttr, Errno> {
        let rel = self.child(parent, name)?;
        let path = self.full_path(&rel);
        std::fs::create_dir(&path).map_err(errno)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(errno)?;
        self.entry(&rel)
    }

    fn unlink(&mut self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        std::fs::remove_file(self.full_path(&rel)).map_err(errno)?;
        // The inode lives on only through handles still open on it.
        if let Some(ino) = self.by_path.remove(&rel)
            && let Some(inode) = self.inodes.get_mut(&ino)
        {
            inode.path = PathBuf::new();
        }
        Ok(())
    }

    fn rmdir(&mut self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child(parent, name)?;
        std::fs::remove_dir(self.full_path(&rel)).map_err(errno)?;
        self.by_path.remove(&rel);
        Ok(())
    }

    fn rename(&mut self, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr) -> Result<(), Errno> {
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        std::fs::rename(self.full_path(&from), self.full_path(&to)).map_err(errno)?;
        self.renamed(&from, &to);
        Ok(())
    }

    fn open(&mut self, ino: INodeNo, flags: i32) -> Result<u64, Errno> {
        let path = self.full_path(&self.inode(ino)?.path);
        let file = open_options(0).open(path).map_err(errno)?;
        let fh = self.open_handle(Some(file));
        if OFlags::from_bits_retain(flags as u32).contains(OFlags::TRUNC) {
            self.truncate(ino.0, Some(FileHandle(fh)), 0)?;
        }
        Ok(fh)
    }

    fn create(&mut self, parent: INodeNo, name: &OsStr, mode: u32, flags: i32) -> Result<(FileAttr, u64), Errno> {
        let rel = self.child(parent, name)?;
        let file = open_options(flags).create(true).mode(mode).open(self.full_path(&rel)).map_err(errno)?;
        let ino = self.entry(&rel)?.ino.0;
        let fh = self.open_handle(Some(file));
        if OFlags::from_bits_retain(flags as u32).contains(OFlags::TRUNC) {
            self.truncate(ino, Some(FileHandle(fh)), 0)?;
        }
        Ok((self.attr(ino, Some(FileHandle(fh)))?, fh))
    }

    /// `.`, `..` and the directory's children, sorted by name, with their inode numbers.
    fn dir_entries(&mut self, ino: INodeNo) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let rel = self.inode(ino)?.path.clone();
        let mut names: Vec<(OsString, FileType)> = Vec::new();
        for entry in std::fs::read_dir(self.full_path(&rel)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            names.push((entry.file_name(), kind));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries = vec![(ino.0, FileType::Directory, ".".into()), (ino.0, FileType::Directory, "..".into())];
        for (name, kind) in names {
            let child = self.ino_of(&rel.join(&name));
            entries.push((child, kind, name));
        }
        Ok(entries)
    }

    /// Mode 0 grows the file (lost with its data unless fsynced); `FALLOC_FL_KEEP_SIZE`, which RocksDB
    /// preallocates its files with, reserves nothing here.
    fn fallocate(&mut self, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        const KEEP_SIZE: i32 = 1;
        match mode {
            KEEP_SIZE => Ok(()),
            0 => {
                let size = self.size(ino.0, fh)?;
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                if end > size {
                    self.inode_mut(ino)?.size = Some(end);
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    fn lose_unfsynced(&mut self) -> Lost {
        let mut lost = Lost::default();
        for inode in self.inodes.values_mut() {
            if !inode.dirty.is_empty() || inode.size.is_some() {
                let name = inode.path.file_name().map(|n| n.to_string_lossy().into_owned());
                lost.files.push(name.unwrap_or_default());
                lost.bytes += inode.dirty.len() as u64 * PAGE;
            }
            inode.dirty.clear();
            inode.size = None;
        }
        lost.files.sort();
        lost
    }
}

/// The filesystem served to the kernel: the state behind a lock shared with [`LazyMount`].
struct LazyFs {
    state: Arc<Mutex<State>>,
}

/// A panic while holding the lock can only come from a bug here; the state is still usable.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl LazyFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A data operation on a faulty disk: waits out the delay (without the lock, so the harness can heal
    /// the disk meanwhile), then fails if the disk fails.
    fn data_op(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let delay = self.state().faults.delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let state = self.state();
        if state.faults.fail {
            return Err(Errno::EIO);
        }
        Ok(state)
    }
}

fn open_options(flags: i32) -> OpenOptions {
    let flags = OFlags::from_bits_retain(flags as u32);
    let mut options = OpenOptions::new();
    // Always read-write: an fsync may come through any handle of the file.
    options.read(true).write(true);
    if flags.contains(OFlags::EXCL) {
        options.create_new(true);
    }
    options
}

fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn attr(reply: ReplyAttr, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = self.state();
        entry(reply, state.child(parent, name).and_then(|rel| state.entry(&rel)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        attr(reply, self.state().attr(ino.0, fh));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        attr(reply, self.state().setattr(ino, mode, (uid, gid), size, fh));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        entry(reply, self.state().mkdir(parent, name, mode & !umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().unlink(parent, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.state().rmdir(parent, name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        empty(reply, self.state().rename(parent, name, newparent, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.state().open(ino, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.state().create(parent, name, mode & !umask, flags) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.data_op().and_then(|state| state.read(ino.0, fh, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.data_op().and_then(|mut state| state.write(ino.0, fh, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() persists nothing: only fsync does.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The inode's dirty pages stay: closing a file does not make its data durable.
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.data_op().and_then(|mut state| state.sync(ino.0, fh)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut state = self.state();
        match state.inode(ino) {
            Ok(_) => {
                let fh = state.open_handle(None);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.state().dir_entries(ino) {
            Ok(entries) => {
                for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory changes reach the backing directory at once and survive a loss; a faulty disk still
        // fails or delays the call.
        empty(reply, self.data_op().map(drop));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let backing = self.state().backing.clone();
        match rustix::fs::statvfs(&backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                u32::try_from(s.f_bsize).unwrap_or(4096),
                u32::try_from(s.f_namemax).unwrap_or(255),
                u32::try_from(s.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state().fallocate(ino, fh, offset, length, mode));
    }
}

/// A mounted [`LazyFs`]; unmounted when dropped.
pub struct LazyMount {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl LazyMount {
    /// Serves `backing` at `mountpoint` (both created if missing). Needs `/dev/fuse` and root.
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<LazyMount> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mut inodes = HashMap::new();
        inodes.insert(INodeNo::ROOT.0, Inode { path: PathBuf::new(), dirty: BTreeMap::new(), size: None });
        let state = Arc::new(Mutex::new(State {
            backing: backing.canonicalize()?,
            faults: DiskFaults::default(),
            inodes,
            by_path: HashMap::from([(PathBuf::new(), INodeNo::ROOT.0)]),
            next_ino: INodeNo::ROOT.0 + 1,
            handles: HashMap::new(),
            next_fh: 1,
        }));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("flotilla-lazyfs".into()), MountOption::RW];
        let session = fuser::spawn_mount(LazyFs { state: state.clone() }, mountpoint, &config).with_context(|| {
            format!("cannot mount a FUSE filesystem on {} (S9 needs /dev/fuse and root)", mountpoint.display())
        })?;
        Ok(LazyMount { state, session: Some(session) })
    }

    /// Drops every write not yet fsynced. Call it only once every process using the mount is gone.
    pub fn lose_unfsynced(&self) -> Lost {
        lock(&self.state).lose_unfsynced()
    }

    /// Makes the disk fail or slow down from the next request on; `DiskFaults::default()` heals it.
    pub fn set_faults(&self, faults: DiskFaults) {
        lock(&self.state).faults = faults;
    }

    /// Dirty bytes held right now (whole pages).
    pub fn dirty_bytes(&self) -> u64 {
        let state = lock(&self.state);
        state.inodes.values().map(|i| i.dirty.len() as u64 * PAGE).sum()
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn mount(dir: &Path) -> Option<LazyMount> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: this machine has no /dev/fuse");
            return None;
        }
        Some(LazyMount::mount(&dir.join("backing"), &dir.join("mnt")).expect("mount (needs root)"))
    }

    fn read(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        File::open(path).expect("open").read_to_end(&mut out).expect("read");
        out
    }

    #[test]
    fn writes_are_seen_at_once_but_only_fsynced_ones_survive_a_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(fs) = mount(dir.path()) else { return };
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(mnt.join("db")).expect("mkdir");
        let log = mnt.join("db/000001.log");
        let mut f = OpenOptions::new().create(true).append(true).open(&log).expect("create");
        f.write_all(b"synced-").expect("write");
        f.sync_all().expect("fsync");
        f.write_all(&[7u8; 5000]).expect("write");
        assert_eq!(read(&log).len(), 7 + 5000, "unsynced writes are read back before a loss");
        assert!(fs.dirty_bytes() >= 4096);

        let mut g = File::create(mnt.join("db/never-synced")).expect("create");
        g.write_all(b"gone").expect("write");
        let tmp = mnt.join("db/CURRENT.tmp");
        let mut h = File::create(&tmp).expect("create");
        h.write_all(b"MANIFEST-000005\n").expect("write");
        h.sync_all().expect("fsync");
        std::fs::rename(&tmp, mnt.join("db/CURRENT")).expect("rename");
        drop((f, g, h));

        let lost = fs.lose_unfsynced();
        assert_eq!(lost.files, ["000001.log", "never-synced"], "{lost:?}");
        assert_eq!(read(&log), b"synced-", "only the fsynced prefix is left");
        assert_eq!(read(&mnt.join("db/never-synced")), b"", "created but never synced: empty");
        assert_eq!(read(&mnt.join("db/CURRENT")), b"MANIFEST-000005\n", "synced then renamed: kept");
        assert_eq!(read(&dir.path().join("backing/db/CURRENT")), b"MANIFEST-000005\n");

        let mut names: Vec<String> = std::fs::read_dir(mnt.join("db"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["000001.log", "CURRENT", "never-synced"]);
        let free = rustix::fs::statvfs(&mnt).expect("statvfs");
        assert!(free.f_blocks > 0, "statfs passes the backing volume through");
    }

    #[test]
    fn a_failing_disk_answers_eio_and_a_slow_one_answers_late_until_healed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(fs) = mount(dir.path()) else { return };
        let path = dir.path().join("mnt/wal");
        let mut f = OpenOptions::new().create(true).append(true).open(&path).expect("create");
        f.write_all(b"before").expect("write");
        fs.set_faults(DiskFaults { fail: true, delay: Duration::ZERO });
        let e = f.write_all(b"during").expect_err("a failing disk refuses writes");
        assert_eq!(e.raw_os_error(), Some(5), "{e}");
        assert_eq!(f.sync_all().expect_err("and fsyncs").raw_os_error(), Some(5));
        assert!(File::open(&path).expect("open is metadata").read_to_end(&mut Vec::new()).is_err(), "and reads");

        let delay = Duration::from_millis(300);
        fs.set_faults(DiskFaults { fail: false, delay });
        let started = std::time::Instant::now();
        f.write_all(b"after").expect("a slow disk still writes");
        f.sync_all().expect("fsync");
        assert!(started.elapsed() >= 2 * delay, "write and fsync each wait: {:?}", started.elapsed());

        fs.set_faults(DiskFaults::default());
        assert_eq!(read(&path), b"beforeafter");
    }

    #[test]
    fn overwrites_truncates_and_unaligned_writes_read_back_as_a_plain_file_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(fs) = mount(dir.path()) else { return };
        let path = dir.path().join("mnt/file");
        let mut model = vec![0u8; 0];
        let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).expect("create");
        let put = |f: &File, at: usize, bytes: &[u8], model: &mut Vec<u8>| {
            f.write_all_at(bytes, at as u64).expect("write");
            if model.len() < at + bytes.len() {
                model.resize(at + bytes.len(), 0);
            }
            model[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(&f, 0, &[1u8; 10_000], &mut model);
        f.sync_data().expect("fsync");
        put(&f, 4090, &[2u8; 20], &mut model);
        put(&f, 12_000, &[3u8; 100], &mut model);
        assert_eq!(read(&path), model);
        f.set_len(8_000).expect("truncate");
        model.truncate(8_000);
        assert_eq!(read(&path), model);
        put(&f, 9_000, &[4u8; 1], &mut model);
        assert_eq!(read(&path), model);
        f.sync_all().expect("fsync");
        assert_eq!(read(&dir.path().join("backing/file")), model, "fsync writes the data through");
        put(&f, 0, &[5u8; 3], &mut model);
        drop(f);
        fs.lose_unfsynced();
        model[..3].copy_from_slice(&[1u8; 3]);
        assert_eq!(read(&path), model, "the overwrite was lost, the synced bytes under it are back");
    }
}
