package planner

import (
	"fmt"
	"time"

	"github.com/robfig/cron/v3"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// InWindow says whether now lies inside one of the maintenance window's
// occurrences and when that next changes (the window's end when inside, the
// next start when outside). A nil window is always open (next is zero).
func InWindow(w *v1alpha1.MaintenanceWindow, now time.Time) (inside bool, next time.Time, err error) {
	if w == nil {
		return true, time.Time{}, nil
	}
	sched, err := parseWindow(w)
	if err != nil {
		return false, time.Time{}, err
	}
	d := w.Duration.Duration
	if d <= 0 {
		return false, time.Time{}, fmt.Errorf("maintenanceWindow.duration must be positive, got %s", d)
	}
	// The first start after now-d: if it is not after now, now is inside
	// the window it opened (it ends at start+d).
	start := sched.Next(now.Add(-d))
	if start.IsZero() {
		return false, time.Time{}, fmt.Errorf("maintenanceWindow.schedule %q never fires", w.Schedule)
	}
	if !start.After(now) {
		return true, start.Add(d), nil
	}
	return false, start, nil
}

func parseWindow(w *v1alpha1.MaintenanceWindow) (cron.Schedule, error) {
	loc := time.UTC
	if w.TimeZone != "" {
		l, err := time.LoadLocation(w.TimeZone)
		if err != nil {
			return nil, fmt.Errorf("maintenanceWindow.timeZone %q: %v", w.TimeZone, err)
		}
		loc = l
	}
	s, err := cron.ParseStandard(w.Schedule)
	if err != nil {
		return nil, fmt.Errorf("maintenanceWindow.schedule %q is not a 5-field cron expression: %v", w.Schedule, err)
	}
	// The parser's default zone is the controller's local one; a window
	// means UTC unless timeZone (or a CRON_TZ= prefix) says otherwise.
	if ss, ok := s.(*cron.SpecSchedule); ok && (w.TimeZone != "" || ss.Location == time.Local) {
		ss.Location = loc
	}
	return s, nil
}
