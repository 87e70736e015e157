package main

import (
	"github.com/nodespawn/nodespawn/schema"
	"github.com/spf13/cobra"
)

// newSchemaCmd is `nodespawn schema`: the manifest's JSON Schema, for
// editors and CI checks.
func newSchemaCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "schema",
		Short: "Print the manifest's JSON Schema (draft 2020-12), for editors and CI checks",
		Long: `schema prints the JSON Schema every manifest is validated against. Point your
editor at it, e.g. with a modeline on the manifest's first line:

  # yaml-language-server: $schema=./nodespawn.schema.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(schema.JSON)
			return err
		},
	}
}
