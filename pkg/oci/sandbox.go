package oci

// Annotations container engines put on a Kubernetes pod's sandbox (the
// "pause" container that only holds the pod's namespaces): containerd's
// CRI plugin and CRI-O.
const (
	AnnotationCRIContainerType  = "io.kubernetes.cri.container-type"
	AnnotationCRIOContainerType = "io.kubernetes.cri-o.ContainerType"
)

// IsPodSandbox reports whether annotations mark a Kubernetes pod sandbox.
// kiwi-shim runs a sandbox in container mode without loop devices: it runs
// no build, and the pod's build containers join its network namespace from
// their own VMs.
func IsPodSandbox(annotations map[string]string) bool {
	return annotations[AnnotationCRIContainerType] == "sandbox" ||
		annotations[AnnotationCRIOContainerType] == "sandbox"
}
