package manifest

import (
	"encoding/json"
	"fmt"
	"math/big"
)

// UnmarshalJSON accepts a string or an integer (written in YAML as
// vm.overcommit_memory: 1), keeping integers in decimal.
func (v *SysctlValue) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*v = SysctlValue(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("sysctl value must be a string or an integer, not %s", b)
	}
	// big.Float keeps values beyond int64 (kernel.shmmax) and 1e3 exact.
	f, ok := new(big.Float).SetPrec(256).SetString(n.String())
	if !ok || !f.IsInt() {
		return fmt.Errorf("sysctl value %s is not an integer", n)
	}
	*v = SysctlValue(f.Text('f', 0))
	return nil
}
