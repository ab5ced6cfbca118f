//go:build k8s

package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// k8sPKI is the test cluster's certificate authority: one CA signs the
// API server's serving certificate and every client certificate (admin,
// controller manager, scheduler, kubelets, the API server towards the
// kubelets); the kubelets serve with their own self-signed certificates,
// which the API server does not verify (no --kubelet-certificate-authority).
// All keys are ECDSA P-256 and live only in the cluster's directory.
type k8sPKI struct {
	dir    string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	serial int64
}

// newK8sPKI makes the CA (ca.crt, ca.key) and the service account signing
// key (sa.key) in dir.
func newK8sPKI(dir string) (*k8sPKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kiwi-shim-test-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &k8sPKI{dir: dir, caCert: cert, caKey: key, serial: 1}
	if err := p.write("ca", der, key); err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("service account key: %w", err)
	}
	if err := writeKey(filepath.Join(dir, "sa.key"), saKey); err != nil {
		return nil, err
	}
	return p, nil
}

// caFile is the CA certificate's path.
func (p *k8sPKI) caFile() string { return filepath.Join(p.dir, "ca.crt") }

// saKeyFile is the service account signing key's path (the API server
// reads the public half from the same file).
func (p *k8sPKI) saKeyFile() string { return filepath.Join(p.dir, "sa.key") }

// issue signs a certificate for name (NAME.crt, NAME.key in the PKI's
// directory): a client certificate for user cn in groups orgs, or, with
// hosts, a serving certificate for those DNS names and IP addresses.
func (p *k8sPKI) issue(name, cn string, orgs []string, hosts ...string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("%s key: %w", name, err)
	}
	p.serial++
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if len(hosts) > 0 {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return "", "", fmt.Errorf("%s certificate: %w", name, err)
	}
	if err := p.write(name, der, key); err != nil {
		return "", "", err
	}
	return filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key"), nil
}

// write stores a certificate and its key as NAME.crt and NAME.key.
func (p *k8sPKI) write(name string, der []byte, key *ecdsa.PrivateKey) error {
	crt := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(filepath.Join(p.dir, name+".crt"), crt, 0o644); err != nil {
		return err
	}
	return writeKey(filepath.Join(p.dir, name+".key"), key)
}

// writeKey stores an EC private key in PEM (SEC 1), which every
// Kubernetes component reads.
func writeKey(path string, key *ecdsa.PrivateKey) error {
	b, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key %s: %w", path, err)
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: b}), 0o600)
}

// kubeconfig writes a kubeconfig for server that authenticates with the
// client certificate certFile/keyFile and trusts the PKI's CA.
func (p *k8sPKI) kubeconfig(path, server, certFile, keyFile string) error {
	conf := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kiwi
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: kiwi
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: kiwi
  context:
    cluster: kiwi
    user: kiwi
current-context: kiwi
`, server, p.caFile(), certFile, keyFile)
	return os.WriteFile(path, []byte(conf), 0o600)
}
