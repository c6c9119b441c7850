package ext4read

// ReadBlock lets tests read a filesystem block as the reader sees it,
// through the journal.
func (fs *FS) ReadBlock(blk uint64, b []byte) error { return fs.readBlock(blk, b) }

// Blocks returns the filesystem's block count.
func (fs *FS) Blocks() uint64 { return fs.sb.blocksCount }
