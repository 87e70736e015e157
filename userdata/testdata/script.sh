#!/bin/sh
echo "apiVersion: nodespawn.dev/v1alpha1" > /tmp/x
