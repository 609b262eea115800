//! LVM thin change tracking (see issue 3).
