package fstree

import "testing"

// TestDataSpaceLeavesSuperblockRoom: pieces of the data space never fall
// in the reserve of a group that holds a superblock copy, come in order
// without overlapping, and hand out every byte asked for.
func TestDataSpaceLeavesSuperblockRoom(t *testing.T) {
	var s dataSpace
	var last int64
	for i, length := range []int64{1, 4096, 5000, 100 << 20, 3 << 30, 7, 130 << 20} {
		var got int64
		err := s.take(length, func(virtual, n int64) error {
			if virtual < last || virtual%blockSize != 0 {
				t.Errorf("take %d: piece at %d after %d", i, virtual, last)
			}
			for b := virtual / blockSize; b < (virtual+n+blockSize-1)/blockSize; b++ {
				if b%GroupBlocks < SuperReserve && SuperCopyGroup(b/GroupBlocks) {
					t.Fatalf("take %d: block %d is in the reserve of group %d", i, b, b/GroupBlocks)
				}
			}
			last = virtual + (n+blockSize-1)/blockSize*blockSize
			got += n
			return nil
		})
		if err != nil || got != length {
			t.Fatalf("take %d: %d of %d bytes: %v", i, got, length, err)
		}
		if s.end != last {
			t.Errorf("take %d: the space ends at %d, the last piece at %d", i, s.end, last)
		}
	}
}
