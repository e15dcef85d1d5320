package rawimage

import "testing"

func TestSpanStripesAscendingOnce(t *testing.T) {
	const r = 1 << regionShift
	for _, tc := range []struct {
		off, length uint64
		want        int // stripes covered
	}{
		{0, 4096, 1},
		{r - 1, 2, 2},
		{0, 0, 1},
		{(stripes - 1) * r, 2 * r, 2}, // wraps: stripes 255 and 0
		{(stripes + 3) * r, r, 1},
		{5 * r, stripes * r, stripes},
		{5*r + 1, (stripes - 1) * r, stripes},
		{0, 1 << 40, stripes},
	} {
		var got []int
		spanOf(tc.off, tc.length).each(func(i int) { got = append(got, i) })
		if len(got) != tc.want {
			t.Errorf("off %d length %d: %d stripes %v, want %d", tc.off, tc.length, len(got), got, tc.want)
		}
		seen := map[int]bool{}
		for j, i := range got {
			if seen[i] || (j > 0 && i <= got[j-1]) || i < 0 || i >= stripes {
				t.Errorf("off %d length %d: stripes %v not ascending and distinct", tc.off, tc.length, got)
				break
			}
			seen[i] = true
		}
	}
}
