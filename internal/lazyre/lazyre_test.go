package lazyre

import "testing"

func TestCompiledOnFirstUseOnce(t *testing.T) {
	re := New(`^a+$`)
	first := re()
	if !first.MatchString("aaa") || first.MatchString("b") {
		t.Errorf("%s matches wrongly", first)
	}
	if re() != first {
		t.Error("the expression was compiled again")
	}
}

func TestBadExpressionPanicsOnUse(t *testing.T) {
	re := New(`(`) // no panic yet
	defer func() {
		if recover() == nil {
			t.Error("a bad expression did not panic on use")
		}
	}()
	re()
}
