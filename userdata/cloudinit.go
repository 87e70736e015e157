package userdata

import "context"

// cloudInitUserData is where cloud-init keeps the user-data it was given,
// whatever its datasource.
const cloudInitUserData = "/var/lib/cloud/instance/user-data.txt"

// cloudInit is the user-data cloud-init stored on its first run.
type cloudInit struct{ root string }

func (cloudInit) Name() string { return "cloud-init" }

func (c cloudInit) Fetch(context.Context) (Source, error) {
	return storedUserData(c.root, cloudInitUserData)
}
